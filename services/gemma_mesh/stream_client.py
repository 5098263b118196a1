"""``gemma-mesh stream``: a ``/v1/stream`` WebSocket client that plays files as a microphone and camera would.

Audio (any format ``audio_io.decode_audio`` reads) is sent as 16 kHz PCM16 chunks of
``chunk_ms``, at real time (``realtime``) or ``speed`` times faster; a photo is sent as camera
frames at ``fps`` for as long as the audio lasts, a video file's frames at their own times (``av``).
On a dropped connection the client resumes the session (``session_id`` + ``last_event_id``) and
resends audio from the gateway's ``audio_clock_ms``, so nothing is lost or duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets
from PIL import Image

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.gateway.protocol import MediaKind, pack_media
from gemma_mesh.model.audio_io import decode_audio

RATE_HZ = 16000
MAX_RECONNECTS = 5


@dataclass
class StreamOptions:
    """What to stream and how. ``url`` is the gateway's base URL (``http://host:port``)."""

    audio: Path
    url: str = "http://127.0.0.1:8000"
    image: Path | None = None
    video: Path | None = None
    task: str = "transcribe"
    target_language: str | None = None
    source_language: str | None = None
    realtime: bool = False
    speed: float = 8.0
    chunk_ms: int = 100
    fps: float = 1.0
    prompt: str = "Describe what you see in one sentence."
    api_key: str | None = None
    partial_interval_ms: int | None = None
    tail_silence_ms: int = 1000


@dataclass
class StreamResult:
    """Every event received (in event-id order, each once), and the session id."""

    session_id: str | None = None
    events: list[dict] = field(default_factory=list)
    reconnects: int = 0

    def of_type(self, *types: str) -> list[dict]:
        return [e for e in self.events if e["type"] in types]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _frames(options: StreamOptions, duration_ms: int) -> Iterator[tuple[int, bytes]]:
    """(media ms, JPEG bytes) of the camera stream."""
    if options.image is not None:
        with Image.open(options.image) as image:
            image.thumbnail((640, 640))
            data = _jpeg(image)
        step = 1000 / options.fps
        t = 0.0
        while t <= duration_ms:
            yield int(t), data
            t += step
    elif options.video is not None:
        import av

        step = 1000 / options.fps
        next_ms = 0.0
        with av.open(str(options.video)) as container:
            for frame in container.decode(video=0):
                ms = float(frame.time or 0) * 1000
                if ms + 1e-6 < next_ms:
                    continue
                image = frame.to_image()
                image.thumbnail((640, 640))
                yield int(ms), _jpeg(image)
                next_ms = ms + step


async def _token(options: StreamOptions) -> str | None:
    if not options.api_key:
        return None
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(
            f"{options.url}/v1/stream/token", headers={"Authorization": f"Bearer {options.api_key}"}
        )
    if reply.status_code != 200:
        raise InvalidRequest(f"token request failed ({reply.status_code}): {reply.text}")
    return reply.json()["token"]


async def stream(options: StreamOptions, on_event: Callable[[dict], None] | None = None) -> StreamResult:
    """Stream ``options.audio`` (and image/video) through a session; return when ``session.ended`` arrives.

    Raises:
        InvalidRequest: unreadable media, a refused session (the ``error`` event's message), or a
            connection that cannot be resumed after ``MAX_RECONNECTS`` tries.
    """
    if not 0 < options.fps <= 30:
        raise InvalidRequest(f"fps must be in (0, 30], got {options.fps}")
    if not options.url.startswith(("http://", "https://")):
        raise InvalidRequest(f"url must be the gateway's http(s):// base URL, got {options.url!r}")
    audio = decode_audio(Path(options.audio), RATE_HZ)
    audio = np.concatenate([audio, np.zeros(RATE_HZ * options.tail_silence_ms // 1000, np.float32)])
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    duration_ms = len(audio) * 1000 // RATE_HZ
    frames = list(_frames(options, duration_ms)) if (options.image or options.video) else []
    config: dict = {
        "task": options.task,
        "audio": {"encoding": "pcm_s16le", "sample_rate_hz": RATE_HZ, "channels": 1},
        "video": {"max_fps": options.fps, "prompt": options.prompt} if frames else None,
    }
    for key in ("target_language", "source_language", "partial_interval_ms"):
        if getattr(options, key):
            config[key] = getattr(options, key)
    ws_url = options.url.replace("http", "ws", 1) + "/v1/stream"
    result = StreamResult()
    last_event_id = 0
    for attempt in range(MAX_RECONNECTS + 1):
        token = await _token(options)
        start: dict = {"type": "session.start", "config": config, "token": token}
        if result.session_id:
            start.update(session_id=result.session_id, last_event_id=last_event_id)
        try:
            async with websockets.connect(ws_url, max_size=None) as ws:
                await ws.send(json.dumps(start))
                started = json.loads(await ws.recv())
                if started["type"] == "error":
                    hint = ""
                    if started.get("code") == "authentication_error" and not options.api_key:
                        hint = " (this gateway needs an API key: --api-key or GEMMA_MESH_API_KEY)"
                    raise InvalidRequest(f"session refused: {started['message']}{hint}")
                resume_ms = int(started.get("audio_clock_ms", 0))
                result.session_id = started["session_id"]
                last_event_id = _record(result, started, last_event_id, on_event)
                sender = asyncio.create_task(_send(ws, options, pcm, frames, resume_ms))
                try:
                    async for raw in ws:
                        event = json.loads(raw)
                        last_event_id = _record(result, event, last_event_id, on_event)
                        if event["type"] == "session.ended":
                            return result
                        if event["type"] == "error" and event.get("fatal"):
                            raise InvalidRequest(f"session closed by the gateway: {event['message']}")
                finally:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                        await sender
        except (
            websockets.ConnectionClosed,
            websockets.InvalidHandshake,
            websockets.InvalidURI,
            OSError,
        ) as error:
            if result.session_id is None:
                raise InvalidRequest(f"cannot connect to {ws_url}: {error}") from None
        result.reconnects = attempt + 1
        await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
    raise InvalidRequest(f"connection to {ws_url} lost {MAX_RECONNECTS + 1} times; giving up")


def _record(result: StreamResult, event: dict, last_event_id: int, on_event) -> int:
    event_id = int(event.get("event_id", 0))
    if event_id and event_id <= last_event_id:
        return last_event_id  # replayed on resume and already seen
    result.events.append(event)
    if on_event is not None:
        on_event(event)
    return max(last_event_id, event_id)


async def _send(
    ws, options: StreamOptions, pcm: bytes, frames: list[tuple[int, bytes]], from_ms: int
) -> None:
    """Send audio from ``from_ms`` (and frames from then on), paced, then ``session.end``."""
    loop = asyncio.get_running_loop()
    chunk_bytes = RATE_HZ * options.chunk_ms // 1000 * 2
    pace = 1.0 if options.realtime else (1.0 / options.speed if options.speed > 0 else 0.0)
    begin = loop.time()
    offset = from_ms * RATE_HZ // 1000 * 2
    pending_frames = [f for f in frames if f[0] >= from_ms]
    while offset < len(pcm):
        media_ms = offset * 1000 // (2 * RATE_HZ)
        while pending_frames and pending_frames[0][0] <= media_ms:
            frame_ms, data = pending_frames.pop(0)
            await ws.send(pack_media(MediaKind.FRAME, frame_ms, data))
        await ws.send(pack_media(MediaKind.AUDIO, media_ms, pcm[offset : offset + chunk_bytes]))
        offset += chunk_bytes
        if pace:
            due = begin + (media_ms + options.chunk_ms - from_ms) / 1000 * pace
            await asyncio.sleep(max(0.0, due - loop.time()))
    await ws.send(json.dumps({"type": "session.end"}))
