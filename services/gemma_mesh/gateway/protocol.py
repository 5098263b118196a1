"""The ``/v1/stream`` WebSocket protocol: every control message and event, as pydantic models.

This module is the single definition; ``docs/protocol.md`` explains it and ``docs/schemas/*.json``
(one JSON Schema per message, written by ``scripts/gen_schemas.py`` and checked in CI) are generated
from it.

Client -> gateway
  * Text frames: JSON control messages ``session.start``, ``session.update``, ``session.end``.
  * Binary frames: ``MEDIA_HEADER`` (5 bytes: kind ``u8``, media timestamp ``u32`` little-endian,
    in ms since the session's media start) followed by the payload: for ``AUDIO`` raw PCM in the
    session's declared encoding, rate and channel count (interleaved); for ``FRAME`` one JPEG or
    PNG image.

Gateway -> client: JSON events, each with ``event_id`` (per session, 1, 2, 3, ... never reused,
also across reconnects) and media timestamps in ms on the session's audio clock (samples received
/ declared rate) or the frame's own timestamp.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from gemma_mesh.common.errors import InvalidRequest

# --- binary media messages ------------------------------------------------------------------


class MediaKind(IntEnum):
    """First byte of a binary WebSocket message."""

    AUDIO = 1
    FRAME = 2


MEDIA_HEADER = struct.Struct("<BI")
"""kind (u8), media timestamp in ms (u32, little-endian); the payload follows."""


def pack_media(kind: MediaKind, timestamp_ms: int, payload: bytes) -> bytes:
    """One binary message: header + payload (what the browser page and ``gemma-mesh stream`` send)."""
    return MEDIA_HEADER.pack(int(kind), int(timestamp_ms) & 0xFFFFFFFF) + payload


def unpack_media(message: bytes) -> tuple[MediaKind, int, bytes]:
    """Split a binary message into (kind, timestamp_ms, payload).

    Raises:
        InvalidRequest: shorter than the header or an unknown kind.
    """
    if len(message) < MEDIA_HEADER.size:
        raise InvalidRequest(
            f"binary message of {len(message)} bytes is shorter than the 5-byte media header"
        )
    kind, timestamp_ms = MEDIA_HEADER.unpack_from(message)
    try:
        media_kind = MediaKind(kind)
    except ValueError:
        raise InvalidRequest(f"unknown media kind {kind} (1 = audio, 2 = frame)") from None
    return media_kind, timestamp_ms, message[MEDIA_HEADER.size :]


# --- session configuration ------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AudioConfig(_Strict):
    """The PCM the client sends. The gateway resamples to the model's rate (16 kHz) with soxr."""

    encoding: Literal["pcm_s16le", "pcm_f32le"] = "pcm_s16le"
    sample_rate_hz: int = Field(16000, ge=8000, le=192000, strict=True)
    channels: int = Field(1, ge=1, le=8, strict=True, description="Interleaved channels; mixed down to mono")


# Bounds of a session's intervals and frame rate: a partial or an analysis less often than once a
# minute, or a camera slower than a frame a minute, is a client bug, not a setting.
MAX_INTERVAL_MS = 60_000
MIN_FPS = 1 / 60


class VideoConfig(_Strict):
    """Camera frames: at most ``max_fps`` per second; every ``analysis_interval_ms`` the newest is analysed."""

    max_fps: float = Field(
        1.0, ge=MIN_FPS, strict=True, description=f"At least {MIN_FPS} (one frame a minute)"
    )
    analysis_interval_ms: int | None = Field(
        None, ge=200, le=MAX_INTERVAL_MS, strict=True, description="None = the gateway's default"
    )
    prompt: str = Field("Describe what you see in one sentence.", min_length=1, max_length=4000)
    max_soft_tokens: int | None = Field(
        None,
        ge=1,
        le=2**31 - 1,  # an int32 on the wire
        strict=True,
        description="Vision soft tokens per frame (70, 140, 280, 560 or 1120); None = the model's "
        "per-frame video budget (70 for Gemma 4)",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt must contain text")
        return prompt


class SessionConfig(_Strict):
    """What a session does. ``task`` ``translate`` needs ``target_language`` (BCP-47)."""

    task: Literal["transcribe", "translate"] = "transcribe"
    source_language: str | None = Field(None, description="BCP-47 hint of the spoken language")
    target_language: str | None = Field(None, description="BCP-47 language to translate into")
    audio: AudioConfig | None = Field(default_factory=AudioConfig, description="None = no audio")
    video: VideoConfig | None = Field(None, description="None = no camera frames")
    partial_interval_ms: int | None = Field(
        None, ge=100, le=MAX_INTERVAL_MS, strict=True, description="None = the gateway's default"
    )


class SessionConfigUpdate(_Strict):
    """Fields of ``SessionConfig`` to change mid-session (audio format cannot change)."""

    task: Literal["transcribe", "translate"] | None = None
    source_language: str | None = None
    target_language: str | None = None
    video: VideoConfig | None = None
    partial_interval_ms: int | None = Field(None, ge=100, le=MAX_INTERVAL_MS, strict=True)


# --- client -> gateway ----------------------------------------------------------------------


class SessionStart(_Strict):
    """Open a new session, or resume ``session_id`` and replay the events after ``last_event_id``."""

    type: Literal["session.start"]
    config: SessionConfig = Field(default_factory=SessionConfig)
    session_id: str | None = Field(None, max_length=128, description="Resume this session")
    last_event_id: int = Field(0, ge=0, strict=True, description="On resume: the last event the client has")
    token: str | None = Field(None, max_length=4096, description="Browser session token (or use a header)")

    @model_validator(mode="after")
    def _resume_fields(self) -> SessionStart:
        if self.last_event_id and not self.session_id:
            raise ValueError("last_event_id is for a resume: give the session_id too")
        return self


class SessionUpdate(_Strict):
    """Change the running session's config."""

    type: Literal["session.update"]
    config: SessionConfigUpdate


class SessionEnd(_Strict):
    """Flush: close the open segment (final caption), finish analyses, then ``session.ended``."""

    type: Literal["session.end"]


ClientMessage = Annotated[SessionStart | SessionUpdate | SessionEnd, Field(discriminator="type")]
CLIENT_MESSAGE = TypeAdapter(ClientMessage)


# --- gateway -> client ----------------------------------------------------------------------


class _Event(BaseModel):
    event_id: int = Field(0, ge=0, description="Per-session, strictly increasing; assigned by the store")


class SessionStarted(_Event):
    type: Literal["session.started"] = "session.started"
    session_id: str
    resumed: bool
    config: SessionConfig
    audio_clock_ms: int = Field(description="Audio the gateway has received so far (resume: send from here)")
    # int first: pydantic's smart union keeps 2097152 an integer (a float-only dict sends 2097152.0)
    limits: dict[str, int | float] = Field(
        description="The limits that apply to this session (integers, except max_fps)"
    )


class _Text(_Event):
    segment_id: int = Field(ge=0)
    start_ms: int = Field(ge=0, description="Segment start on the session's audio clock")
    end_ms: int = Field(ge=0, description="End of the audio this hypothesis covers")
    text: str = Field(description="The whole hypothesis: committed + tentative")


class _Partial(_Text):
    committed: str = Field(description="Stable prefix: never changes in later events of this segment")
    tentative: str = Field(description="May still change")


class CaptionPartial(_Partial):
    type: Literal["caption.partial"] = "caption.partial"


class CaptionFinal(_Text):
    type: Literal["caption.final"] = "caption.final"
    reason: Literal["silence", "max_length", "end"] = Field(description="Why the segment closed")


class TranslationPartial(_Partial):
    type: Literal["translation.partial"] = "translation.partial"
    language: str


class TranslationFinal(_Text):
    type: Literal["translation.final"] = "translation.final"
    language: str
    reason: Literal["silence", "max_length", "end"]


class FrameAnalysis(_Event):
    type: Literal["frame.analysis"] = "frame.analysis"
    analysis_id: int = Field(ge=0)
    frame_ms: int = Field(ge=0, description="The analysed frame's media timestamp")
    delta: str = Field(description="New text of this analysis")
    text: str = Field(description="The analysis so far")
    done: bool


class Warning(_Event):
    type: Literal["warning"] = "warning"
    code: str = Field(description="e.g. backlog, frames_dropped, events_coalesced, store_degraded")
    message: str
    details: dict[str, float] = Field(default_factory=dict)


class Error(_Event):
    type: Literal["error"] = "error"
    code: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, ...")
    message: str
    param: str | None = None
    fatal: bool = Field(False, description="True when the gateway closes the socket after this event")


class SessionEnded(_Event):
    type: Literal["session.ended"] = "session.ended"
    reason: Literal["client", "max_session_length"]
    audio_clock_ms: int


ServerEvent = Annotated[
    SessionStarted
    | CaptionPartial
    | CaptionFinal
    | TranslationPartial
    | TranslationFinal
    | FrameAnalysis
    | Warning
    | Error
    | SessionEnded,
    Field(discriminator="type"),
]
SERVER_EVENT = TypeAdapter(ServerEvent)

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "session.start": SessionStart,
    "session.update": SessionUpdate,
    "session.end": SessionEnd,
    "session.started": SessionStarted,
    "caption.partial": CaptionPartial,
    "caption.final": CaptionFinal,
    "translation.partial": TranslationPartial,
    "translation.final": TranslationFinal,
    "frame.analysis": FrameAnalysis,
    "warning": Warning,
    "error": Error,
    "session.ended": SessionEnded,
}
"""Message type -> model, for the generated JSON Schemas (docs/schemas/<type>.json)."""
