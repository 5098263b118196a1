"""Gateway settings (environment prefix ``GEMMA_MESH_GATEWAY_``; Helm ``gateway.*`` values).

Every limit the gateway enforces is a field here, with its unit in the name or the description;
``docs/protocol.md`` lists them for clients.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gemma_mesh.common.settings import MiB, split_list


class GatewaySettings(BaseSettings):
    """Addresses, security, session defaults and limits of the WebSocket/HTTP gateway."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_MESH_GATEWAY_", extra="ignore")

    # --- where things are -------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP/WebSocket port; 0 picks a free one")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve Prometheus /metrics on this port only (off the public port, so an Ingress "
        "never exposes it); None = /metrics on the main port",
    )
    decoder_target: str = Field("127.0.0.1:50051", description="gRPC target of the decoder")
    audio_target: str = Field("127.0.0.1:50052", description="gRPC target of the audio frontend")
    vision_target: str = Field("127.0.0.1:50053", description="gRPC target of the vision encoder")
    redis_url: str | None = Field(
        None, description="Session store; None = in-process store (one replica, no resume across replicas)"
    )
    redis_key_prefix: str = Field(
        "gemma-mesh",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every Redis key (sessions, events, leases): meshes sharing one Redis "
        "use different prefixes",
    )
    served_model_name: str = Field("gemma-4-e4b-it", description="The model id of /v1/models")
    max_grpc_message_bytes: int = Field(64 * MiB, ge=MiB, description="Largest gRPC message to a backend")
    backend_timeout_s: float = Field(120.0, gt=0, description="Deadline of one backend call")
    readiness_check_timeout_s: float = Field(
        1.0,
        gt=0,
        description="Deadline of each /readyz check (backends' health, Redis ping); they run at once, so "
        "/readyz answers within about this long (keep it under the readiness probe's timeoutSeconds)",
    )
    grpc_keepalive_time_s: float = Field(
        20.0, gt=0, description="HTTP/2 keepalive ping interval on the channels to the backends"
    )
    grpc_keepalive_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A keepalive ping not acknowledged in this long closes the connection (its calls fail "
        "UNAVAILABLE instead of hanging to their deadline when a node is lost)",
    )
    grpc_retry_attempts: int = Field(
        3,
        ge=1,
        le=5,
        description="Attempts of an idempotent unary backend call that got UNAVAILABLE (a draining or "
        "lost pod), first included; 1 = no retries. Streams are not retried by the channel",
    )
    drain_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM: seconds live sessions get to deliver their finals before the socket "
        "closes with 1012 (keep it under terminationGracePeriodSeconds, minus the preStop sleep)",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    # --- security ---------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode, BeforeValidator(split_list)] = Field(
        default_factory=list, description="Accepted API keys (Bearer); empty = no authentication"
    )
    token_secret: SecretStr | None = Field(
        None,
        description="HMAC key of browser session tokens; None = one the replicas share through Redis "
        "(created by the first, gateway.token_secret), or one per process without Redis",
    )
    token_ttl_s: int = Field(300, ge=10, description="Lifetime of a browser session token, in seconds")
    allowed_origins: Annotated[list[str], NoDecode, BeforeValidator(split_list)] = Field(
        default_factory=list,
        description="Origins allowed to open /v1/stream and call the API from a page; empty = same origin only",
    )
    max_sessions_per_key: int = Field(
        64,
        ge=1,
        description="Live WebSocket sessions per API key (all callers share one key when auth is off)",
    )
    max_requests_per_key: int = Field(16, ge=1, description="HTTP API requests in flight per API key")

    # --- WebSocket limits -------------------------------------------------------------------
    ws_compression: bool = Field(
        False,
        description="Offer permessage-deflate on WebSockets. Off: PCM audio and JPEG frames do not "
        "compress, and deflating them costs CPU on both ends",
    )
    max_message_bytes: int = Field(
        2 * MiB, ge=1024, description="Largest WebSocket message (binary or text), in bytes"
    )
    max_control_bytes: int = Field(64 * 1024, ge=256, description="Largest JSON control message, in bytes")
    max_audio_chunk_ms: int = Field(2000, ge=10, description="Longest audio chunk in one binary message")
    max_frame_bytes: int = Field(1 * MiB, ge=1024, description="Largest camera frame (JPEG/PNG), in bytes")
    max_frame_pixels: int = Field(1920 * 1080, ge=64 * 64, description="Largest decoded frame, in pixels")
    max_fps: float = Field(5.0, gt=0, le=60, description="Highest camera frame rate a session may declare")
    max_session_s: int = Field(4 * 3600, ge=10, description="Longest session, in seconds of wall time")
    max_pending_audio_s: float = Field(
        20.0, gt=0, description="Audio queued for the VAD/recogniser before the session is told it is behind"
    )
    max_outbound_events: int = Field(
        256,
        ge=8,
        description="Events a client may leave untaken (queued, or sent and not acknowledged by its "
        "TCP stack) before partials are coalesced; when only finals remain, the socket closes 1013",
    )
    slow_client_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A client that takes no event for this long while events wait is closed with "
        "1013 and a reason (it resumes from its last event id); below ws_ping_timeout_s, so it "
        "comes before the keepalive's 1006",
    )
    ws_ping_interval_s: float = Field(
        20.0, gt=0, description="WebSocket keepalive: seconds between the server's pings"
    )
    ws_ping_timeout_s: float = Field(
        20.0, gt=0, description="WebSocket keepalive: a ping unanswered this long closes the socket (1006)"
    )
    event_log_max_events: int = Field(10000, ge=100, description="Events kept per session for resume")
    resume_wait_s: float = Field(
        15.0, gt=0, description="How long a resume waits for the session's previous connection to let go"
    )
    session_ttl_s: int = Field(3600, ge=10, description="How long an idle or ended session can be resumed")
    session_lease_s: float = Field(
        5.0,
        ge=0.5,
        description="Lease of a session on its connection, in seconds (refreshed every fifth of it): "
        "how long after a replica dies its sessions can be resumed elsewhere",
    )

    # --- captioning and frame analysis defaults (a session may override within the limits) ---
    partial_interval_ms: int = Field(500, ge=100, description="Default interval between partial decodes")
    caption_latency_target_ms: int = Field(
        1000,
        ge=100,
        description="Objective for partial caption latency (audio arrival to the first partial covering "
        "it): camera-frame analyses wait while a session's recogniser lags by more than this (or twice "
        "its partial interval) or the gateway's p95 of the last seconds misses it",
    )
    analysis_interval_ms: int = Field(2000, ge=200, description="Default interval between frame analyses")
    max_caption_tokens: int = Field(96, ge=1, description="Most tokens generated per caption decode")
    caption_tokens_per_audio_s: float = Field(
        8.0,
        gt=0,
        description="Caption token budget: 8 + this many per second of audio, up to max_caption_tokens",
    )
    max_analysis_tokens: int = Field(64, ge=1, description="Tokens generated per frame analysis")
    max_concurrent_analyses: int = Field(
        4,
        ge=1,
        description="Frame analyses in flight per gateway replica, all sessions together; a session "
        "whose turn comes while all are busy waits another interval (its newest frame wins). Bounds "
        "the decoder rows and prefill that camera analysis takes from captions at once",
    )
    vad_model_path: str | None = Field(
        None, description="silero_vad.onnx; None = the file shipped with gemma-mesh (silero-vad 6.2.3)"
    )

    # --- HTTP API limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(25 * MiB, ge=1024, description="Largest audio upload (OpenAI's limit)")
    max_request_bytes: int = Field(32 * MiB, ge=1024, description="Largest JSON request body")
    max_audio_s: float = Field(1800.0, gt=0, description="Longest audio of one transcription request")
    max_images_per_request: int = Field(8, ge=1, description="Images in one chat completion")
    max_videos_per_request: int = Field(
        1, ge=0, description="Videos (video_url parts) in one chat completion"
    )
    max_completion_tokens: int = Field(4096, ge=1, description="Largest max_tokens of a chat completion")

    @model_validator(mode="after")
    def _slow_client_before_keepalive(self) -> GatewaySettings:
        if self.slow_client_timeout_s >= self.ws_ping_timeout_s:
            raise ValueError(
                f"slow_client_timeout_s ({self.slow_client_timeout_s:g}) must be below ws_ping_timeout_s "
                f"({self.ws_ping_timeout_s:g}): a stalled client gets 1013 with a reason, not the "
                "keepalive's 1006"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {value!r}")
        return value or None
