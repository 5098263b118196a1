"""Wire types of the OpenAI Realtime API (GA) as the gateway speaks them.

Server events are the ``openai`` SDK's own models (``openai.types.realtime``), built here and
serialised without their unset fields, so their names and shapes are exactly the SDK's. Client
events are parsed with the SDK's models too, except ``session.update``: the SDK's session types
allow only 24 kHz PCM, and this gateway also takes 16 kHz, so the session's configuration has its
own models here, field for field those of ``RealtimeTranscriptionSessionCreateRequest`` and
``RealtimeTranslationSessionUpdateRequest`` (extra fields are accepted and ignored, as OpenAI does).

Errors: ``error_event`` gives OpenAI's ``error`` event (``error.type`` ``invalid_request_error`` or
``server_error``, ``code``, ``message``, ``param`` and the client's ``event_id``).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from openai.types.realtime import (
    InputAudioBufferAppendEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    RealtimeErrorEvent,
)
from openai.types.realtime.realtime_error import RealtimeError
from openai.types.realtime.realtime_translation_input_audio_buffer_append_event import (
    RealtimeTranslationInputAudioBufferAppendEvent,
)
from openai.types.realtime.realtime_translation_session_close_event import (
    RealtimeTranslationSessionCloseEvent,
)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gemma_mesh.common.errors import InvalidRequest, MeshError


class _Open(BaseModel):
    """OpenAI's objects: unknown fields are accepted (and not applied)."""

    model_config = ConfigDict(extra="allow")


class AudioFormat(_Open):
    """``audio/pcm``: 16-bit little-endian mono PCM at ``rate`` (24000, OpenAI's only rate, or 16000)."""

    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000, 16000] = 24000


class Transcription(_Open):
    """``audio.input.transcription``: ``model`` (the served model id or an OpenAI transcription
    model name; both run this mesh's model), ``language`` (ISO-639-1 / BCP-47 hint), ``prompt``
    (context given before the audio)."""

    model: str | None = None
    language: str | None = Field(None, max_length=64)
    prompt: str | None = Field(None, max_length=4096)


class ServerVad(_Open):
    """``server_vad`` turn detection: Silero VAD onset ``threshold``, ``prefix_padding_ms`` kept
    before the speech, ``silence_duration_ms`` that ends a turn (OpenAI's defaults).
    ``semantic_vad`` is accepted and runs as ``server_vad`` (there is no turn-end model here)."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = Field(0.5, gt=0, lt=1)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=32, le=10000)


class NoiseReduction(_Open):
    """Accepted and reported back; not applied (the model hears the audio as sent)."""

    type: Literal["near_field", "far_field"] | None = None


class TranscriptionInput(_Open):
    format: AudioFormat = Field(default_factory=AudioFormat)
    transcription: Transcription = Field(default_factory=Transcription)
    noise_reduction: NoiseReduction | None = None
    turn_detection: ServerVad | None = Field(default_factory=ServerVad)


class TranscriptionAudio(_Open):
    input: TranscriptionInput = Field(default_factory=TranscriptionInput)


class TranscriptionSession(_Open):
    """A transcription session's effective configuration (``session.created`` / ``session.updated``)."""

    type: Literal["transcription"] = "transcription"
    audio: TranscriptionAudio = Field(default_factory=TranscriptionAudio)
    include: list[str] | None = None


class TranslationInputTranscription(_Open):
    model: str


class TranslationInput(_Open):
    format: AudioFormat = Field(default_factory=AudioFormat)
    transcription: TranslationInputTranscription | None = None
    noise_reduction: NoiseReduction | None = None


class TranslationOutput(_Open):
    language: str | None = Field(None, max_length=64)


class TranslationAudio(_Open):
    input: TranslationInput = Field(default_factory=TranslationInput)
    output: TranslationOutput = Field(default_factory=TranslationOutput)


class TranslationSession(_Open):
    """A translation session (``RealtimeTranslationSession``): ``id``, ``model``, ``expires_at``, ``audio``."""

    type: Literal["translation"] = "translation"
    id: str = ""
    model: str = ""
    expires_at: int = 0
    audio: TranslationAudio = Field(default_factory=TranslationAudio)


class SessionUpdate(_Open):
    """``session.update``: ``session`` holds only the fields to change (merged by the adapter)."""

    type: Literal["session.update"]
    session: dict[str, Any]
    event_id: str | None = None


TRANSCRIPTION_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)
TRANSLATION_EVENT_TYPES = ("session.update", "session.input_audio_buffer.append", "session.close")
TRANSCRIPTION_CLIENT_EVENT = TypeAdapter(
    Annotated[
        SessionUpdate
        | InputAudioBufferAppendEvent
        | InputAudioBufferCommitEvent
        | InputAudioBufferClearEvent,
        Field(discriminator="type"),
    ]
)
TRANSLATION_CLIENT_EVENT = TypeAdapter(
    Annotated[
        SessionUpdate | RealtimeTranslationInputAudioBufferAppendEvent | RealtimeTranslationSessionCloseEvent,
        Field(discriminator="type"),
    ]
)


def new_id(prefix: str) -> str:
    """OpenAI-style ids: ``event_…``, ``item_…``, ``sess_…`` (22 hex digits)."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def parse_client_event(text: str, adapter: TypeAdapter, supported: tuple[str, ...], max_bytes: int):
    """One client event (JSON text) -> its model.

    Raises:
        InvalidRequest: over ``max_bytes`` (``max_message_bytes``), not JSON, an unknown ``type``
            (``param`` ``type``, listing the supported ones) or a field that does not validate.
    """
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidRequest(
            f"event of {size} bytes exceeds the limit of {max_bytes} bytes (max_message_bytes)"
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"the event is not valid JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("the event must be a JSON object")
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    if raw.get("type") not in supported:
        error = InvalidRequest(
            f"Invalid value: {raw.get('type')!r}. Supported values are: {', '.join(supported)}.",
            param="type",
        )
        error.event_id = event_id
        raise error
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        error = InvalidRequest(f"{raw['type']}: {where or 'event'}: {first['msg']}", param=where or None)
        error.event_id = event_id
        raise error from None


def error_event(error: MeshError, event_id: str | None = None) -> dict:
    """OpenAI's ``error`` event for ``error`` (``event_id``: the client event that caused it)."""
    kind = "server_error" if error.http_status >= 500 else "invalid_request_error"
    return dump(
        RealtimeErrorEvent(
            type="error",
            event_id=new_id("event"),
            error=RealtimeError(
                type=kind,
                code=error.code,
                message=error.message,
                param=error.param,
                event_id=event_id or getattr(error, "event_id", None),
            ),
        )
    )


def dump(event: BaseModel) -> dict:
    """A server event's JSON object: the fields set, OpenAI's names (``None`` where OpenAI sends null)."""
    return event.model_dump(mode="json", exclude_unset=True)


def merge(current: dict, changes: dict) -> dict:
    """``session.update`` semantics: fields present replace the current ones (objects merge field
    by field; ``null`` clears, e.g. ``turn_detection: null`` for manual commits)."""
    out = dict(current)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_session(kind: str, session: BaseModel) -> dict:
    """``session.created`` or ``session.updated`` with the session's effective configuration."""
    return {"type": kind, "event_id": new_id("event"), "session": session.model_dump(mode="json")}
