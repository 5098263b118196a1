"""The gateway's view of the mesh: async clients of the audio frontend, vision encoder and decoder.

One ``MeshClient`` per gateway process holds one grpc.aio channel per backend (client-side
round_robin over a headless Service's addresses, see ``common.grpc_server.open_channel``). Backend
errors come back as the project's error classes (``common.errors.ERRORS_BY_GRPC_STATUS``) with
the backend's message, so the WebSocket and HTTP adapters report them like their own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gemma_mesh.common.errors import ERRORS_BY_GRPC_STATUS, BackendUnavailable, MeshError
from gemma_mesh.common.grpc_server import KeepaliveSettings, error_detail, open_channel
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.tensors import from_tensor_pb, to_tensor_pb
from gemma_mesh.gateway.mesh_types import (  # the values of this module's API
    Answer,
    AudioSegment,
    ChatMessage,
    Delta,
    Done,
    ImageSoftTokens,
    Sampling,
    SoftTokens,
    TokenLogprobs,
    ToolCallDelta,
)
from gemma_mesh.proto.v1 import (
    audio_pb2,
    audio_pb2_grpc,
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)

log = get_logger(__name__)


def _mesh_error(error: grpc.aio.AioRpcError, backend: str) -> MeshError:
    detail = error_detail(error)
    message = detail.message if detail is not None and detail.message else (error.details() or "")
    param = detail.param if detail is not None and detail.param else None
    cls = ERRORS_BY_GRPC_STATUS.get(error.code().name)
    if cls is None:
        return MeshError(f"{backend}: {message or error.code().name}")
    if cls is BackendUnavailable:
        message = f"{backend} unavailable: {message or error.code().name}"
    return cls(message, param=param)


class AudioEncodeStream:
    """One ``AudioFrontend.EncodeStream`` call: 16 kHz float32 chunks in, soft tokens accumulated.

    Tokens are final as soon as their 40 ms of audio has arrived (see docs/encoders.md) and equal
    whole-clip encoding to ~1e-6, so a growing segment costs one encoder pass per sample instead
    of one per partial, and its final reuses them (``finish``). ``failed`` turns True if the call
    breaks (callers fall back to ``Encode``). With ``provisional_tail`` the tokens held end with
    the provisional tail of the last chunk sent (``AudioStreamConfig.provisional_tail``), so they
    are the whole-clip encoding of everything sent, and ``covered_ms`` reaches ``sent_ms``.
    """

    def __init__(
        self,
        stub: audio_pb2_grpc.AudioFrontendStub,
        sample_rate_hz: int,
        timeout_s: float,
        *,
        provisional_tail: bool = False,
    ) -> None:
        self.provisional_tail = provisional_tail
        self._queue: asyncio.Queue[bytes | int | None] = asyncio.Queue()  # PCM, the end (samples), close
        self._sample_rate_hz = sample_rate_hz
        self._call = stub.EncodeStream(self._requests(), timeout=timeout_s)
        self._tokens: list[np.ndarray] = []
        self._count = 0  # tokens held
        self.covered_ms = 0
        self.token_ms: float | None = None
        self.sent_ms = 0.0
        self.failed = False
        self._progress = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _requests(self):
        config = audio_pb2.AudioStreamConfig(
            encoding=audio_pb2.F32LE,
            sample_rate_hz=self._sample_rate_hz,
            channels=1,
            provisional_tail=self.provisional_tail,
        )
        yield audio_pb2.AudioStreamRequest(config=config)
        while (data := await self._queue.get()) is not None:
            if isinstance(data, int):
                yield audio_pb2.AudioStreamRequest(end=audio_pb2.AudioStreamEnd(samples=data))
            else:
                yield audio_pb2.AudioStreamRequest(pcm=data)

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                tokens = from_tensor_pb(reply.soft_tokens, param="soft_tokens")
                if reply.first_token < self._count:  # a rewind or a provisional tail: replace from there
                    self._tokens = [np.concatenate(self._tokens)[: reply.first_token]]
                    self._count = reply.first_token
                self._tokens.append(tokens)
                self._count += tokens.shape[0]
                self.covered_ms = int(reply.range.end_ms)
                if reply.num_soft_tokens > 0 and not reply.provisional:  # the encoder's ms per token
                    self.token_ms = (reply.range.end_ms - reply.range.start_ms) / reply.num_soft_tokens
                self._progress.set()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.failed = True
                detail = error_detail(error)
                if detail is not None and detail.param == "end.samples":
                    # The segment ends further back than the audio service rewinds
                    # (stream_rewind_ms): the caller encodes it whole; nothing failed.
                    log.info("segment ends before the audio stream can rewind; encoding it whole")
                else:
                    log.warning("audio stream failed", code=error.code().name, error=error.details())
        except MeshError as error:
            self.failed = True
            log.warning("audio stream sent a bad tensor", error=error.message)
        finally:
            self._progress.set()

    async def wait_caught_up(self, timeout_s: float) -> None:
        """Wait until the tokens the sent audio makes final have arrived: all but the last two
        tokens' worth (one still open, one of lookahead), or with ``provisional_tail`` the tail of
        the last chunk sent (``covered_ms`` = ``sent_ms``); or until failure or ``timeout_s``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.failed and not self._reader.done():
            if self.provisional_tail:
                if self.covered_ms >= int(self.sent_ms):
                    return
            elif self.token_ms is not None and self.covered_ms >= self.sent_ms - 2 * self.token_ms:
                return
            self._progress.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return

    def send(self, audio: np.ndarray) -> None:
        """Queue mono float32 samples at the stream's rate."""
        if audio.size:
            self._queue.put_nowait(np.ascontiguousarray(audio, dtype="<f4").tobytes())
            self.sent_ms += audio.shape[0] * 1000 / self._sample_rate_hz

    def soft_tokens(self) -> SoftTokens | None:
        """The soft tokens received so far (covering ``covered_ms`` of the stream), or None."""
        if not self._tokens:
            return None
        if len(self._tokens) > 1:
            self._tokens = [np.concatenate(self._tokens)]
        return SoftTokens(modality=common_pb2.AUDIO, tokens=to_tensor_pb(self._tokens[0]))

    async def finish(self, samples: int, timeout_s: float) -> SoftTokens | None:
        """End the clip after ``samples`` of the samples sent (``AudioStreamEnd``: the encoder redoes
        the tokens that read past it, as ``Encode`` of those samples would) and return all its soft
        tokens; None when the call fails or takes longer than ``timeout_s`` (then use ``Encode``)."""
        self._queue.put_nowait(samples)
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        except TimeoutError:
            self.failed = True
        if self.failed:
            self.cancel()
            return None
        return self.soft_tokens()

    def cancel(self) -> None:
        """Stop the call (a segment's audio that nobody will finish)."""
        self._queue.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()


_CHANNELS = {decoder_pb2.ANSWER: "answer", decoder_pb2.REASONING: "reasoning"}
_FINISH = {decoder_pb2.STOP: "stop", decoder_pb2.LENGTH: "length", decoder_pb2.TOOL_CALLS: "tool_calls"}


class MeshClient:
    """Async clients of the three gRPC services.

    Args:
        decoder_target, audio_target, vision_target: gRPC targets (``host:port`` or ``dns:///name:port``).
        max_message_bytes: gRPC message limit, both directions.
        timeout_s: deadline of each call.
        keepalive: keepalive pings and UNAVAILABLE retries of the channels (``KeepaliveSettings``).
    """

    def __init__(
        self,
        decoder_target: str,
        audio_target: str,
        vision_target: str,
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
        timeout_s: float = 120.0,
        keepalive: KeepaliveSettings | None = None,
    ) -> None:
        self._channels = {
            "decoder": open_channel(decoder_target, max_message_bytes, keepalive),
            "audio": open_channel(audio_target, max_message_bytes, keepalive),
            "vision": open_channel(vision_target, max_message_bytes, keepalive),
        }
        self._decoder = decoder_pb2_grpc.DecoderStub(self._channels["decoder"])
        self._audio = audio_pb2_grpc.AudioFrontendStub(self._channels["audio"])
        self._vision = vision_pb2_grpc.VisionEncoderStub(self._channels["vision"])
        self._vision_budgets: tuple[int, ...] | None = None
        self.timeout_s = timeout_s

    async def close(self) -> None:
        """Close the channels (in-flight calls are cancelled)."""
        for channel in self._channels.values():
            await channel.close()

    async def serving(self, backend: str, timeout_s: float = 1.0) -> bool:
        """Whether ``backend`` (``decoder``, ``audio``, ``vision``) answers SERVING on
        ``grpc.health.v1`` ``""`` within ``timeout_s`` (a loading, broken or draining backend does not)."""
        stub = health_pb2_grpc.HealthStub(self._channels[backend])
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def health(self, timeout_s: float = 1.0) -> dict[str, bool]:
        """``{backend: serving}`` of every backend, checked concurrently (``timeout_s`` in all)."""
        names = list(self._channels)
        results = await asyncio.gather(*(self.serving(name, timeout_s) for name in names))
        return dict(zip(names, results, strict=True))

    async def encode_audio(
        self, *, pcm_f32: np.ndarray | None = None, sample_rate_hz: int = 16000, file: bytes | None = None
    ) -> tuple[list[AudioSegment], float]:
        """Audio soft tokens of one clip: mono float32 PCM, or an encoded file (WAV, FLAC, MP3, OGG, WebM).

        Clips longer than the model's audio window are split by the audio frontend at quiet points.

        Returns:
            (segments, audio seconds).
        Raises:
            InvalidRequest: bad audio; BackendUnavailable: the audio frontend cannot be reached.
        """
        if file is not None:
            request = audio_pb2.EncodeAudioRequest(
                file=audio_pb2.EncodedAudio(data=file), split_long_audio=True
            )
        else:
            assert pcm_f32 is not None
            data = np.ascontiguousarray(pcm_f32, dtype="<f4").tobytes()
            request = audio_pb2.EncodeAudioRequest(
                pcm=audio_pb2.PcmAudio(
                    data=data, encoding=audio_pb2.F32LE, sample_rate_hz=sample_rate_hz, channels=1
                ),
                split_long_audio=True,
            )
        try:
            reply = await self._audio.Encode(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _mesh_error(error, "audio frontend") from None
        segments = [
            AudioSegment(
                SoftTokens(modality=common_pb2.AUDIO, tokens=s.soft_tokens), s.range.start_ms, s.range.end_ms
            )
            for s in reply.segments
        ]
        return segments, float(reply.audio_seconds)

    def encode_stream(
        self, sample_rate_hz: int = 16000, *, provisional_tail: bool = False
    ) -> AudioEncodeStream:
        """Open an ``EncodeStream`` for mono float32 audio at ``sample_rate_hz`` (must be in a running
        loop); ``provisional_tail``: see ``AudioEncodeStream``."""
        return AudioEncodeStream(
            self._audio, sample_rate_hz, self.timeout_s, provisional_tail=provisional_tail
        )

    async def encode_image(
        self, data: bytes, *, max_soft_tokens: int = 0, video_frame: bool = False
    ) -> ImageSoftTokens:
        """Vision soft tokens of one encoded image (JPEG, PNG, WebP, GIF).

        ``video_frame``: a camera frame, encoded as the model encodes video frames (its per-frame
        budget, 70 soft tokens for Gemma 4, when ``max_soft_tokens`` is 0).

        Raises:
            InvalidRequest: not a decodable image, or over the encoder's pixel limit.
            BackendUnavailable: the vision encoder cannot be reached.
        """
        request = vision_pb2.EncodeImageRequest(
            image=vision_pb2.ImageInput(
                encoded=data, max_soft_tokens=max_soft_tokens, video_frame=video_frame
            )
        )
        try:
            reply = await self._vision.Encode(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _mesh_error(error, "vision encoder") from None
        return ImageSoftTokens(
            SoftTokens(modality=common_pb2.IMAGE, tokens=reply.soft_tokens), reply.width, reply.height
        )

    async def encode_video(self, data: bytes, *, max_soft_tokens: int = 0, num_frames: int = 0) -> SoftTokens:
        """Vision soft tokens of an encoded video (MP4, WebM, ...): the encoder samples its frames
        (0 = the bundle's defaults) and encodes each at the per-frame budget; one VIDEO part with
        the frames' timestamps, which the decoder's template writes as mm:ss.

        Raises:
            InvalidRequest: not a decodable video, too long or too large (the encoder's limits).
            BackendUnavailable: the vision encoder cannot be reached.
        """
        request = vision_pb2.EncodeVideoRequest(
            data=data, max_soft_tokens=max_soft_tokens, num_frames=num_frames
        )
        try:
            reply = await self._vision.EncodeVideo(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _mesh_error(error, "vision encoder") from None
        tokens = np.concatenate([from_tensor_pb(f.soft_tokens) for f in reply.frames])
        frames = [
            decoder_pb2.VideoFrame(timestamp_s=f.timestamp_s, num_soft_tokens=f.num_soft_tokens)
            for f in reply.frames
        ]
        return SoftTokens(modality=common_pb2.VIDEO, tokens=to_tensor_pb(tokens), frames=frames)

    async def vision_budgets(self) -> tuple[int, ...]:
        """The soft-token budgets the vision encoder accepts (``Describe``; cached once known).

        Raises:
            BackendUnavailable: the vision encoder cannot be reached (or is still loading).
        """
        if self._vision_budgets is None:
            try:
                reply = await self._vision.Describe(vision_pb2.DescribeRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as error:
                raise _mesh_error(error, "vision encoder") from None
            self._vision_budgets = tuple(reply.supported_soft_tokens)
        return self._vision_budgets

    async def generate(
        self, messages: Sequence[ChatMessage], sampling: Sampling, *, request_id: str | None = None
    ) -> AsyncIterator[Delta | Done]:
        """Stream one generation: ``Delta`` events, then one ``Done``. Cancelling the iterator cancels the call.

        Raises:
            InvalidRequest: the decoder refused the request (prompt over the context, bad sampling).
            Overloaded: the decoder's queue is full. BackendUnavailable: it cannot be reached.
        """
        pb_messages = []
        for message in messages:
            content = [
                decoder_pb2.ContentPart(text=p.text)
                if p.soft_tokens is None
                else decoder_pb2.ContentPart(soft_tokens=p.soft_tokens)
                for p in message.parts
            ]
            pb_messages.append(
                decoder_pb2.Message(
                    role=message.role,
                    content=content,
                    tool_calls_json=message.tool_calls_json,
                    tool_call_id=message.tool_call_id,
                    name=message.name,
                )
            )
        request = decoder_pb2.GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            messages=pb_messages,
            sampling=decoder_pb2.SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                min_p=sampling.min_p,
                logit_bias=sampling.logit_bias,
            ),
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop),
            enable_thinking=sampling.enable_thinking,
            prefix_cache_key=sampling.prefix_cache_key,
            priority=sampling.priority,
            stream_interval_tokens=sampling.stream_interval_tokens,
            tools_json=sampling.tools_json,
            tool_choice=sampling.tool_choice,
            parallel_tool_calls=sampling.parallel_tool_calls,
            logprobs=sampling.logprobs,
            thinking_token_budget=sampling.thinking_token_budget,
            reasoning_effort=sampling.reasoning_effort,
        )
        if sampling.prediction_ids or sampling.prediction_text:
            request.prediction.token_ids.extend(sampling.prediction_ids)
            request.prediction.text = sampling.prediction_text
        if sampling.constraint is not None:
            kind, text = sampling.constraint
            if kind == "json_object":
                request.constraint.json_object = True
            else:
                setattr(request.constraint, kind, text)
        call = self._decoder.Generate(request, timeout=self.timeout_s)
        try:
            async for reply in call:
                if reply.HasField("delta"):
                    d = reply.delta
                    calls = [ToolCallDelta(c.index, c.id, c.name, c.arguments) for c in d.tool_calls]
                    logprobs = [
                        TokenLogprobs(
                            e.chosen.token,
                            e.chosen.token_bytes,
                            e.chosen.logprob,
                            [(t.token, t.token_bytes, t.logprob) for t in e.top],
                        )
                        for e in d.logprobs
                    ]
                    yield Delta(
                        d.text, list(d.token_ids), _CHANNELS.get(d.channel, "answer"), calls, logprobs
                    )
                else:
                    f = reply.finished
                    yield Done(
                        _FINISH.get(f.reason, "stop"),
                        f.usage.prompt_tokens,
                        f.usage.completion_tokens,
                        f.usage.cached_prompt_tokens,
                        f.timings.ttft_ms,
                        f.timings.total_ms,
                        f.usage.accepted_prediction_tokens,
                        f.usage.rejected_prediction_tokens,
                    )
        except grpc.aio.AioRpcError as error:
            raise _mesh_error(error, "decoder") from None
        finally:
            call.cancel()

    async def stream_answer(
        self,
        messages: Sequence[ChatMessage],
        sampling: Sampling,
        *,
        until: Callable[[str, str], bool] | None = None,
        on_delta: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> Answer:
        """The answer channel of one generation (its text, token ids and completion tokens).

        ``on_delta(delta, text)`` is awaited for every non-empty answer delta; when ``until(text,
        delta)`` turns True the generation ends there: the call is cancelled and the decoder frees
        its row at its next step (the tokens counted are those received).

        Raises:
            as ``generate``.
        """
        text = ""
        token_ids: list[int] = []
        logprobs: list[float] = []
        completion_tokens = None
        stream = self.generate(messages, sampling)
        try:
            async for event in stream:
                if isinstance(event, Done):
                    completion_tokens = event.completion_tokens
                    continue
                if event.channel != "answer":
                    continue
                token_ids += event.token_ids
                logprobs += [entry.logprob for entry in event.logprobs]
                if not event.text:
                    continue
                text += event.text
                if on_delta is not None:
                    await on_delta(event.text, text)
                if until is not None and until(text, event.text):
                    break
        finally:
            await stream.aclose()
        completion = len(token_ids) if completion_tokens is None else completion_tokens
        return Answer(text, token_ids, completion, logprobs)

    async def complete(self, messages: Sequence[ChatMessage], sampling: Sampling) -> tuple[str, Done]:
        """The whole answer of one generation (answer channel only) and its ``Done``."""
        parts: list[str] = []
        done: Done | None = None
        async for event in self.generate(messages, sampling):
            if isinstance(event, Delta):
                if event.channel == "answer":
                    parts.append(event.text)
            else:
                done = event
        assert done is not None, "decoder stream ended without a Finished message"
        return "".join(parts), done
