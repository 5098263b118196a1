"""Routes of the OpenAI-compatible API (vLLM's thin ``api_router.py``: parse, call serving, pick the response).

* ``GET /v1/models``, ``GET /v1/models/{model}``
* ``POST /v1/chat/completions``: JSON (at most ``max_request_bytes``, else 413); ``stream: true``
  answers ``text/event-stream``: ``data: <chunk JSON>`` events, then ``data: [DONE]``.
* ``POST /v1/audio/transcriptions``, ``POST /v1/audio/translations``: multipart ``file`` (at most
  ``max_upload_bytes``, else 413) and the fields of ``TranscriptionRequest``; a transcription with
  ``stream=true`` answers ``text/event-stream`` (``transcript.text.delta`` events, then
  ``transcript.text.done``).

Every route checks the Bearer key (``Authenticator.check_key``) and the page origin, and holds one
of the key's in-flight request slots while it works (for a stream, until the stream ends). A
client that disconnects cancels the work (vLLM's ``with_cancellation``): before the response
starts, the handler task is cancelled; mid-stream, the stream's generator is closed; either way
the decoder's gRPC call is cancelled and the slot freed.
Errors are ``MeshError`` exceptions: the app's handlers turn them into OpenAI error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from contextlib import ExitStack
from typing import TYPE_CHECKING, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from gemma_mesh.common.errors import InvalidRequest, PayloadTooLarge
from gemma_mesh.gateway.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    TranscriptionRequest,
    TranscriptionResponse,
    TranscriptionResponseVerbose,
)
from gemma_mesh.gateway.openai.serving import OpenAIServingChat, OpenAIServingModels
from gemma_mesh.gateway.openai.serving_transcription import OpenAIServingTranscription

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gemma_mesh.gateway.state import GatewayState

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible API"])

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request the client gave up on (never received)
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # form fields and part headers allowed beyond the file itself
_PLAIN_MEDIA_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


def _state(request: Request) -> GatewayState:
    return request.app.state.gw


def _authorize(request: Request) -> str:
    """Origin and Bearer key -> key id. Raises PermissionDenied (403), Unauthenticated (401)."""
    gw = _state(request)
    gw.auth.check_origin(request.headers.get("origin"), request.headers.get("host"))
    return gw.auth.check_key(request.headers.get("authorization"))


def _check_declared_length(request: Request, limit: int, setting: str) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes ({setting})")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes, declared or streamed."""
    _check_declared_length(request, limit, "max_request_bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when the client disconnected first (``work`` is then cancelled).
    The request body must have been read already (the next message is the disconnect)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation finish (the decoder call is cancelled, its slot freed) before
            # answering: a task asked to cancel is not yet done, and has no result to read.
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    return task.result()


def _field_path(loc: tuple, data: object) -> tuple:
    """``loc`` without pydantic's union and tag entries (``"user"``, ``"list[...]"``, ``"str"``): only
    the keys and indices that exist in the request, so ``param`` names the field as the client sent it."""
    path = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            continue
        path.append(part)
    return tuple(path)


def _invalid(error: ValidationError, data: object) -> RequestValidationError:
    """A 400 for the app's handler: the most specific error first (deepest field path), the field
    path as sent, pydantic's "Value error, " prefix dropped."""
    errors = []
    for e in error.errors(include_url=False, include_context=False, include_input=False):
        path = _field_path(e["loc"], data)
        errors.append({**e, "loc": path, "msg": e["msg"].removeprefix("Value error, ")})
    errors.sort(key=lambda e: -len(e["loc"]))
    return RequestValidationError(errors)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> Response:
    """The served model (``served_model_name``)."""
    _authorize(request)
    return _json(OpenAIServingModels(_state(request).settings).list_models())


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def show_model(model_id: str, request: Request) -> Response:
    """One model; 404 with an OpenAI error body for any id but the served one."""
    _authorize(request)
    return _json(OpenAIServingModels(_state(request).settings).show_model(model_id))


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(request: Request) -> Response:
    """OpenAI's chat completions; the body is a ``ChatCompletionRequest`` (read here, so the size
    limit applies before parsing)."""
    gw = _state(request)
    kid = _authorize(request)
    body = await _read_body(request, gw.settings.max_request_bytes)
    try:
        data = json.loads(body)
    except ValueError as error:
        raise InvalidRequest(f"request body is not valid JSON: {error}") from None
    try:
        parsed = ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise _invalid(error, data) from None
    serving = OpenAIServingChat(gw.clients, gw.settings, gw.metrics)
    slot = ExitStack()
    slot.enter_context(gw.auth.request_slot(kid))
    try:
        result = await _cancel_on_disconnect(request, serving.create_chat_completion(parsed))
    except BaseException:
        slot.close()
        raise
    if result is None or isinstance(result, ChatCompletionResponse):
        slot.close()
        return _json(result) if result is not None else Response(status_code=CLIENT_CLOSED_REQUEST)
    return StreamingResponse(
        _release_after(result, slot),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(slot.close),  # if the body never starts (ExitStack closes once)
    )


async def _release_after(stream: AsyncIterator[str], slot: ExitStack) -> AsyncIterator[str]:
    """Pass the SSE lines through; on the end, an error or a disconnect (cancellation), close the
    serving generator (cancelling the decoder call) and free the request slot."""
    try:
        async for line in stream:
            yield line
    finally:
        try:
            await stream.aclose()
        finally:
            slot.close()


async def _transcription_form(request: Request, limit: int) -> tuple[bytes, TranscriptionRequest]:
    """The multipart ``file`` and the other fields, validated. Raises PayloadTooLarge, InvalidRequest."""
    _check_declared_length(request, limit + MULTIPART_OVERHEAD_BYTES, "max_upload_bytes")
    async with request.form(max_files=1, max_fields=32) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file: a multipart file field named 'file' is required", param="file")
        if upload.size is not None and upload.size > limit:
            raise PayloadTooLarge(
                f"file is {upload.size} bytes; the limit is {limit} bytes (max_upload_bytes)", param="file"
            )
        data = await upload.read(limit + 1)
        fields: dict[str, object] = {
            k: v
            for k, v in form.multi_items()
            if isinstance(v, str) and not k.startswith("timestamp_granularities")
        }
        granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    if granularities:
        fields["timestamp_granularities"] = granularities
    try:
        return data, TranscriptionRequest.model_validate(fields)
    except ValidationError as error:
        raise _invalid(error, fields) from None


async def _transcribe(request: Request, task: str) -> Response:
    gw = _state(request)
    kid = _authorize(request)
    data, parsed = await _transcription_form(request, gw.settings.max_upload_bytes)
    serving = OpenAIServingTranscription(gw.clients, gw.settings, gw.metrics, gw.vad_settings)
    slot = ExitStack()
    slot.enter_context(gw.auth.request_slot(kid))
    try:
        result = await _cancel_on_disconnect(request, serving.create_transcription(data, parsed, task))
    except BaseException:
        slot.close()
        raise
    if parsed.stream and result is not None:
        return StreamingResponse(
            _release_after(result, slot),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(slot.close),
        )
    slot.close()
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(result, str):
        return PlainTextResponse(result, media_type=_PLAIN_MEDIA_TYPES[parsed.response_format])
    return _json(result)


@router.post("/audio/transcriptions", response_model=TranscriptionResponse | TranscriptionResponseVerbose)
async def create_transcription(request: Request) -> Response:
    """Speech to text in the spoken language (multipart: file, model, language, prompt,
    response_format, temperature)."""
    return await _transcribe(request, "transcribe")


@router.post("/audio/translations", response_model=TranscriptionResponse | TranscriptionResponseVerbose)
async def create_translation(request: Request) -> Response:
    """Speech to English text (multipart: file, model, prompt, response_format, temperature)."""
    return await _transcribe(request, "translate")
