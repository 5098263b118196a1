"""The base of the OpenAI API's wire models: unknown fields accepted and logged, and the error body.

Mirrors vLLM's ``OpenAIBaseModel`` (``vllm/entrypoints/openai/protocol.py``): OpenAI adds fields
often, and a client newer than this gateway must keep working.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from gemma_mesh.common.logging import get_logger

log = get_logger("gateway.openai.protocol")


def is_none(value: Any) -> bool:
    """``exclude_if`` predicate: a field that is None is left out of the JSON."""
    return value is None


class OpenAIBaseModel(BaseModel):
    """Base of every wire model: unknown fields are accepted and logged, never an error (as OpenAI)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.info("ignored request fields", model=type(self).__name__, fields=sorted(self.model_extra))
        return self


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """OpenAI's error body (also sent as one SSE ``data:`` event when a stream fails midway)."""

    error: ErrorInfo
