"""Live camera-frame analysis of one session: newest frame wins, analysed every ``analysis_interval_ms``.

Frames are checked cheaply on arrival (size, format and pixel count from the header, with Pillow);
accepted frames replace the one waiting, which is counted as dropped (the mesh is behind, or the
client sends faster than the analysis interval). Every interval the waiting frame goes through
VisionEncoder.Encode (as a video frame) and Decoder.Generate with the session's prompt, at a lower
decoder priority than captions; the answer streams as ``frame.analysis`` events (``done`` on the
last). An answer that falls into a loop (``RepetitionGuard.ends_in_loop``) is ended there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import warnings
from collections.abc import Awaitable, Callable

from PIL import Image, UnidentifiedImageError

from gemma_mesh.common.errors import InvalidRequest, MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.captioning import RepetitionGuard
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.mesh_types import PRIORITY_FRAME_ANALYSIS, ChatMessage, Part, Sampling
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.protocol import Error, FrameAnalysis, VideoConfig
from gemma_mesh.gateway.protocol import Warning as WarningEvent

log = get_logger(__name__)
_LOOPS = RepetitionGuard()  # stateless: one for every analysis

Emit = Callable[[object], Awaitable[None]]
ACCEPTED_FORMATS = ("JPEG", "PNG")


def check_frame(data: bytes, *, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    """Validate one camera frame from its header -> (width, height) in pixels.

    Raises:
        InvalidRequest: empty, over ``max_bytes``, not a JPEG/PNG Pillow can identify, or over ``max_pixels``.
    """
    if not data:
        raise InvalidRequest("empty frame")
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes (max_frame_bytes)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise InvalidRequest(
            f"frame exceeds the limit of {max_pixels} pixels (max_frame_pixels)", param="frame"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidRequest("frame is not a readable JPEG or PNG image", param="frame") from None
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidRequest(f"frame format {fmt} is not accepted (JPEG or PNG)")
    if width * height > max_pixels:
        raise InvalidRequest(
            f"frame of {width}x{height} pixels exceeds the limit of {max_pixels} pixels (max_frame_pixels)"
        )
    return width, height


class FramePipeline:
    """Analysis of one session's camera frames.

    Args:
        video: the session's video config (prompt, ``max_fps``, interval, soft-token budget).
        default_interval_ms: ``GatewaySettings.analysis_interval_ms``.
        max_tokens: tokens per analysis.
        first_analysis_id: analysis ids continue across reconnects.
        captions_behind: True while captions miss their latency objective (``CaptionPipeline.behind``);
            analyses wait (the waiting frame keeps being replaced, and counted as dropped) so the mesh
            catches up on speech first. The session gets a ``frames_deferred`` warning when analyses
            start waiting (once until one runs again).
        slots: the gateway's analyses in flight (``max_concurrent_analyses``), shared by every
            session in turn (first come, first served); a session waiting for one keeps replacing
            its frame with newer ones and analyses the newest it has when its turn comes (no
            warning: sharing the slots is normal operation).
    """

    def __init__(
        self,
        *,
        clients: MeshClient,
        video: VideoConfig,
        emit: Emit,
        metrics: GatewayMetrics,
        default_interval_ms: int,
        max_tokens: int,
        first_analysis_id: int = 0,
        captions_behind: Callable[[], bool] | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.clients = clients
        self.captions_behind = captions_behind
        self.slots = slots
        self.video = video
        self.emit = emit
        self.metrics = metrics
        self.default_interval_ms = default_interval_ms
        self.max_tokens = max_tokens
        self.next_analysis_id = first_analysis_id
        self.dropped = 0
        self._waiting: tuple[bytes, int] | None = None
        self._deferred = False  # analyses are waiting for the captions (warning sent)
        self._last_accepted_ms: int | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    @property
    def interval_s(self) -> float:
        return (self.video.analysis_interval_ms or self.default_interval_ms) / 1000

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def finish(self) -> None:
        """Analyse the frame still waiting, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def push(self, data: bytes, timestamp_ms: int) -> bool:
        """Offer a (validated) frame; returns False when it was dropped for exceeding ``max_fps``."""
        self.metrics.frames_received.inc()
        min_gap_ms = 1000 / self.video.max_fps
        if (
            self._last_accepted_ms is not None
            and 0 <= timestamp_ms - self._last_accepted_ms < min_gap_ms * 0.9
        ):
            self._drop()
            return False
        self._last_accepted_ms = timestamp_ms
        if self._waiting is not None:
            self._drop()
        self._waiting = (data, timestamp_ms)
        self._wake.set()
        return True

    def _drop(self) -> None:
        self.dropped += 1
        self.metrics.frames_dropped.inc()

    async def _loop(self) -> None:
        last = 0.0
        while True:
            if self._waiting is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self.interval_s - (time.monotonic() - last)
            if wait > 0 and not self._closing:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                except TimeoutError:
                    pass
                if not self._closing:
                    continue
            if not self._closing and self.captions_behind is not None and self.captions_behind():
                # Captions come first: retry after another interval with whatever frame is newest.
                last = time.monotonic()
                if not self._deferred:
                    self._deferred = True
                    self.metrics.warnings.labels("frames_deferred").inc()
                    await self.emit(
                        WarningEvent(
                            code="frames_deferred",
                            message="captions are behind their latency objective: frame analyses wait "
                            "(the newest frame is analysed once they catch up; older ones are dropped)",
                        )
                    )
                continue
            self._deferred = False
            # In turn with the other sessions for a slot (first come, first served).
            async with self.slots if self.slots is not None else contextlib.nullcontext():
                last = time.monotonic()
                await self._analyse_newest()

    async def _analyse_newest(self) -> None:
        """Analyse the newest waiting frame (it may have been replaced while a slot was awaited)."""
        if self._waiting is not None:
            frame, timestamp_ms = self._waiting
            self._waiting = None
            await self._analyse(frame, timestamp_ms)

    async def _analyse(self, frame: bytes, timestamp_ms: int) -> None:
        analysis_id = self.next_analysis_id
        self.next_analysis_id += 1
        text = ""
        try:
            image = await self.clients.encode_image(
                frame, max_soft_tokens=self.video.max_soft_tokens or 0, video_frame=True
            )
            message = ChatMessage("user", [Part(soft_tokens=image.soft_tokens), Part(text=self.video.prompt)])

            async def on_delta(delta: str, text: str) -> None:
                await self.emit(
                    FrameAnalysis(
                        analysis_id=analysis_id, frame_ms=timestamp_ms, delta=delta, text=text, done=False
                    )
                )

            # A degenerate answer is ended at its loop instead of running to max_tokens.
            answer = await self.clients.stream_answer(
                [message],
                Sampling(max_tokens=self.max_tokens, enable_thinking=False, priority=PRIORITY_FRAME_ANALYSIS),
                until=_LOOPS.ends_in_loop,
                on_delta=on_delta,
            )
            text = answer.text
            self.metrics.tokens_generated.inc(answer.completion_tokens)
        except MeshError as error:
            self.metrics.errors.labels(error.code).inc()
            log.warning("frame analysis failed", code=error.code, error=error.message)
            param = error.param
            if param and param.endswith("max_soft_tokens"):  # the session's budget, not the frame
                param = "video.max_soft_tokens"
            await self.emit(
                Error(code=error.code, message=f"frame at {timestamp_ms} ms: {error.message}", param=param)
            )
            return
        self.metrics.frames_analysed.inc()
        await self.emit(
            FrameAnalysis(analysis_id=analysis_id, frame_ms=timestamp_ms, delta="", text=text, done=True)
        )
