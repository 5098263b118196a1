"""Settings of every service, declared once (pydantic-settings, environment prefix ``GEMMA_MESH_``).

Each service has one class; field names match the Helm chart's ``values.yaml`` keys. Nothing else
reads the environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


def split_list(value: Any) -> Any:
    """A list setting from the environment: a JSON list (``["a","b"]``, what the chart renders) or
    comma-separated text (``a,b``, what people type); a single value is a one-item list."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f'not a JSON list ({error.msg}); write a,b or ["a","b"]') from None
    return [item.strip() for item in text.split(",") if item.strip()]


class GrpcServiceSettings(BaseSettings):
    """What every gRPC service shares: addresses, message limits, the bundle, ONNX Runtime threads."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_MESH_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 in containers)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None = off")
    max_message_bytes: int = Field(
        64 * MiB,
        ge=MiB,
        description="Largest gRPC message, sent or received (five 768x768 images need > 4 MiB)",
    )
    bundle: Path | None = Field(None, description="Bundle directory; None = the embedded tiny bundle")
    providers: Annotated[list[str], NoDecode, BeforeValidator(split_list)] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers, in order of preference",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per operator (0 = default)")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads across operators (0 = default)")
    allow_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's idle intra-op threads spin between runs (its default). Off here: "
        "several services share a node's cores, and spinning threads take the CPU the others need",
    )
    blas_threads: int = Field(
        1,
        ge=0,
        description="numpy's BLAS threads (0 = the library's default, one per core): the services' numpy "
        "work (log-mel, sampling) is small per call, and extra threads only spin against ONNX Runtime's",
    )
    max_connection_age_s: float = Field(
        300.0,
        gt=0,
        description="Connections are closed (gracefully) after this age, so clients re-resolve DNS",
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Seconds in-flight calls get on SIGTERM")
    keepalive_time_s: float = Field(
        60.0,
        gt=0,
        description="The server pings each client connection after this long without a frame, so the "
        "streams of a client that vanished (a lost gateway node) are cancelled and free their work",
    )
    keepalive_timeout_s: float = Field(
        20.0, gt=0, description="A server ping not acknowledged in this long closes the connection"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
