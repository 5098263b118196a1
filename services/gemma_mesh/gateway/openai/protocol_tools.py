"""Wire models of structured outputs and tool calling in chat completions (OpenAI's shapes).

``response_format`` (``json_object``, ``json_schema``), ``tools`` / ``tool_choice``, and the
calls in answers and stream deltas. The decoder enforces the schemas (``decoder.proto``
``Constraint``, ``tools_json``); these models only check the shapes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from gemma_mesh.gateway.openai.protocol_base import OpenAIBaseModel, is_none

# --- request ------------------------------------------------------------------------------------


class JsonSchemaFormat(OpenAIBaseModel):
    """``response_format.json_schema``: the answer is JSON that validates against ``schema``.

    The decoder constrains every token to the schema (llguidance), with ``strict`` or without (as
    vLLM does): the answer always validates when it ends within ``max_tokens`` (finish_reason
    ``stop``). The keywords llguidance supports are listed in its ``docs/json_schema.md``; one it
    does not is a 400 naming ``response_format.json_schema.schema``.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(None, strict=True)


class ResponseFormat(OpenAIBaseModel):
    """``text`` (default), ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self

    def constraint(self) -> tuple[str, str] | None:
        """The decoder's constraint: ``(kind, text)`` (``decoder.proto`` ``Constraint``), or None."""
        if self.type == "json_object":
            return ("json_object", "")
        if self.type == "json_schema" and self.json_schema is not None:
            return ("json_schema", json.dumps(self.json_schema.schema_))
        return None


class FunctionDefinition(OpenAIBaseModel):
    """A callable function: its JSON-schema ``parameters`` are rendered into Gemma's system turn."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, strict=True)


class ChatCompletionToolParam(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class ChatCompletionNamedToolChoice(OpenAIBaseModel):
    """``{"type": "function", "function": {"name": ...}}``: call that function."""

    type: Literal["function"]
    function: NamedFunction


# --- answers ------------------------------------------------------------------------------------


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object's text")


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = Field(None, exclude_if=is_none)
    arguments: str | None = Field(None, exclude_if=is_none)


class DeltaToolCall(OpenAIBaseModel):
    """A streamed call fragment: the first of a call has ``id``, ``type`` and the name."""

    index: int
    id: str | None = Field(None, exclude_if=is_none)
    type: Literal["function"] | None = Field(None, exclude_if=is_none)
    function: DeltaFunctionCall
