"""``gemma_mesh.v1.AudioFrontend`` over grpc.aio: protobuf <-> `AudioEngine`, metrics, worker threads.

Errors are raised as ``MeshError`` values and mapped to status codes once, by
``common.grpc_server.ErrorInterceptor``; this module only counts them (``errors_total{rpc,code}``).
Decoding and encoding run on a thread pool so the event loop keeps serving other calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gemma_mesh.audio import metrics
from gemma_mesh.audio.serving import AudioEngine, AudioStream, EncodedClip
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.audio.streaming import TokenBlock
from gemma_mesh.common.errors import EngineDead, InvalidRequest, MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.tensors import to_tensor_pb
from gemma_mesh.proto.v1 import audio_pb2, audio_pb2_grpc, common_pb2

log = get_logger("audio")
T = TypeVar("T")

SERVICE_NAME = audio_pb2.DESCRIPTOR.services_by_name["AudioFrontend"].full_name
_ENCODINGS = {audio_pb2.S16LE: "s16le", audio_pb2.F32LE: "f32le"}


def pcm_encoding(value: int, *, param: str = "encoding") -> str:
    """``PcmEncoding`` enum -> ``audio_io`` name. Raises InvalidRequest for UNSPECIFIED or unknown values."""
    name = _ENCODINGS.get(value)
    if name is None:
        raise InvalidRequest(f"{param} must be S16LE or F32LE, got {value}", param=param)
    return name


def error_code(exc: BaseException) -> str:
    """The gRPC status name a failed call ends with (for ``errors_total``)."""
    if isinstance(exc, MeshError):
        return exc.grpc_status
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED"
    return "INTERNAL"


def clip_to_pb(clip: EncodedClip) -> audio_pb2.EncodeAudioResponse:
    """`EncodedClip` -> ``EncodeAudioResponse`` (one Tensor ``[n, H]`` per segment)."""
    return audio_pb2.EncodeAudioResponse(
        segments=[
            audio_pb2.AudioSegment(
                soft_tokens=to_tensor_pb(s.tokens),
                num_soft_tokens=int(s.tokens.shape[0]),
                range=common_pb2.MediaRange(start_ms=s.start_ms, end_ms=s.end_ms),
            )
            for s in clip.segments
        ],
        audio_seconds=clip.audio_seconds,
    )


def block_to_pb(block: TokenBlock) -> audio_pb2.AudioStreamResponse:
    """`TokenBlock` -> ``AudioStreamResponse``."""
    return audio_pb2.AudioStreamResponse(
        soft_tokens=to_tensor_pb(block.tokens),
        num_soft_tokens=int(block.tokens.shape[0]),
        range=common_pb2.MediaRange(start_ms=block.start_ms, end_ms=block.end_ms),
        first_token=block.first_token,
        provisional=block.provisional,
    )


# Messages read ahead of the encoder per stream; a full queue pushes back on the client (flow control).
STREAM_READ_AHEAD_MESSAGES = 64
_END = object()


@dataclass(frozen=True)
class StreamEnd:
    """An ``AudioStreamEnd`` message: the clip ends after ``samples`` input samples."""

    samples: int


async def coalesced_pcm(
    requests: AsyncIterator[audio_pb2.AudioStreamRequest], max_bytes: int
) -> AsyncIterator[bytes | StreamEnd]:
    """The PCM of a stream's messages (after its config), joining whatever queued up while the encoder
    was busy, up to ``max_bytes`` per step. In real time that is one chunk per step; when behind, steps
    grow, the fixed left-context cost per step is shared, and the stream catches up. An end message
    comes out as a ``StreamEnd`` after the PCM before it.

    Raises:
        InvalidRequest: a second config message, one chunk over ``max_bytes``, or a message after
            the end message (in stream order).
    """
    queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_READ_AHEAD_MESSAGES)

    async def read() -> None:
        try:
            async for request in requests:
                await queue.put(request)
            await queue.put(_END)
        except Exception as exc:  # surfaces in the consumer, after the chunks before it
            await queue.put(exc)

    def pcm_of(item: Any) -> bytes:
        if isinstance(item, BaseException):
            raise item
        if item.WhichOneof("kind") != "pcm":
            raise InvalidRequest("config may be sent only once, as the first message", param="config")
        if len(item.pcm) > max_bytes:
            raise InvalidRequest(f"PCM chunk is {len(item.pcm)} bytes, more than the limit of {max_bytes}")
        return item.pcm

    def joinable(item: Any, size: int) -> bool:
        return (
            isinstance(item, audio_pb2.AudioStreamRequest)
            and item.WhichOneof("kind") == "pcm"
            and size + len(item.pcm) <= max_bytes
        )

    def is_end(item: Any) -> bool:
        return isinstance(item, audio_pb2.AudioStreamRequest) and item.WhichOneof("kind") == "end"

    reader = asyncio.create_task(read())
    held: Any = None
    try:
        while True:
            item = held if held is not None else await queue.get()
            held = None
            if item is _END:
                return
            if is_end(item):
                yield StreamEnd(int(item.end.samples))
                if (after := await queue.get()) is not _END:
                    if isinstance(after, BaseException):  # the reader's own error
                        raise after
                    raise InvalidRequest("nothing may follow a stream's end message", param="end")
                return
            parts = [pcm_of(item)]
            size = len(parts[0])
            while not queue.empty():
                nxt = queue.get_nowait()
                if not joinable(nxt, size):
                    held = nxt
                    break
                parts.append(pcm_of(nxt))
                size += len(parts[-1])
            if size:
                yield b"".join(parts)
    finally:
        reader.cancel()


class AudioFrontendServicer(audio_pb2_grpc.AudioFrontendServicer):
    """The RPCs. ``engine`` is attached once the bundle is loaded; until then calls get UNAVAILABLE."""

    def __init__(self, settings: AudioSettings, engine: AudioEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self._pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="audio-encode")

    def close(self) -> None:
        """Stop the worker threads (after the server has stopped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _engine(self) -> AudioEngine:
        if self.engine is None:
            raise EngineDead("the audio encoder is still loading")
        return self.engine

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @contextmanager
    def _observe(self, rpc: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except GeneratorExit:  # the caller closed a stream early: not an error of ours
            raise
        except BaseException as exc:
            metrics.ERRORS.labels(rpc, error_code(exc)).inc()
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(rpc).observe(time.perf_counter() - start)

    # ------------------------------------------------------------------------------ Encode
    def _encode(self, request: audio_pb2.EncodeAudioRequest) -> EncodedClip:
        engine = self._engine()
        source = request.WhichOneof("source")
        if source == "pcm":
            pcm = request.pcm
            samples = engine.samples_from_pcm(
                pcm.data, pcm_encoding(pcm.encoding, param="pcm.encoding"), pcm.sample_rate_hz, pcm.channels
            )
        elif source == "file":
            samples = engine.samples_from_file(request.file.data, request.file.declared_sample_rate_hz)
        else:
            raise InvalidRequest("set pcm or file", param="source")
        return engine.encode_clip(samples, split_long_audio=request.split_long_audio)

    async def Encode(
        self, request: audio_pb2.EncodeAudioRequest, unused_context: grpc.aio.ServicerContext
    ) -> audio_pb2.EncodeAudioResponse:
        """One clip (PCM or an encoded file) -> soft tokens, one segment per piece."""
        with self._observe("Encode"):
            start = time.perf_counter()
            clip = await self._run(self._encode, request)
            response = clip_to_pb(clip)
            seconds = time.perf_counter() - start
            tokens = sum(s.tokens.shape[0] for s in clip.segments)
            metrics.AUDIO_SECONDS.labels("Encode").inc(clip.audio_seconds)
            metrics.SOFT_TOKENS.labels("Encode").inc(tokens)
            metrics.REAL_TIME_FACTOR.labels("Encode").observe(seconds / max(clip.audio_seconds, 1e-9))
            log.info(
                "encoded",
                rpc="Encode",
                audio_s=round(clip.audio_seconds, 3),
                segments=len(clip.segments),
                soft_tokens=tokens,
                ms=round(seconds * 1000, 1),
            )
            return response

    # ------------------------------------------------------------------------ EncodeStream
    async def _open(self, requests: AsyncIterator[audio_pb2.AudioStreamRequest]) -> AudioStream:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidRequest("the stream ended before its config message", param="config") from None
        if first.WhichOneof("kind") != "config":
            raise InvalidRequest("the first message of a stream must be its config", param="config")
        cfg = first.config
        encoding = pcm_encoding(cfg.encoding, param="config.encoding")
        return self._engine().open_stream(
            encoding, cfg.sample_rate_hz, cfg.channels, provisional_tail=cfg.provisional_tail
        )

    async def EncodeStream(
        self,
        request_iterator: AsyncIterator[audio_pb2.AudioStreamRequest],
        unused_context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[audio_pb2.AudioStreamResponse]:
        """PCM chunks in (config first), final soft tokens out as soon as they are final."""
        with self._observe("EncodeStream"):
            requests = aiter(request_iterator)
            stream = await self._open(requests)
            metrics.ACTIVE_STREAMS.inc()
            busy = 0.0
            try:
                end_samples = None
                async with aclosing(coalesced_pcm(requests, self.settings.max_stream_chunk_bytes)) as chunks:
                    async for data in chunks:
                        if isinstance(data, StreamEnd):
                            end_samples = data.samples
                            continue
                        start = time.perf_counter()
                        blocks = await self._run(stream.push, data)
                        busy += time.perf_counter() - start
                        metrics.STREAM_STEP_SECONDS.observe(time.perf_counter() - start)
                        for block in blocks:
                            yield block_to_pb(block)
                start = time.perf_counter()
                for block in await self._run(stream.finish, end_samples):
                    yield block_to_pb(block)
                busy += time.perf_counter() - start
            finally:
                stream.close()
                metrics.ACTIVE_STREAMS.dec()
                audio_s = stream.audio_seconds
                metrics.AUDIO_SECONDS.labels("EncodeStream").inc(audio_s)
                metrics.SOFT_TOKENS.labels("EncodeStream").inc(stream.encoder.emitted_tokens)
                if audio_s > 0:
                    metrics.REAL_TIME_FACTOR.labels("EncodeStream").observe(busy / audio_s)
                log.info(
                    "stream closed",
                    rpc="EncodeStream",
                    audio_s=round(audio_s, 3),
                    soft_tokens=stream.encoder.emitted_tokens,
                    busy_ms=round(busy * 1000, 1),
                )
