"""Live captioning and speech translation of one session: VAD segments -> partial and final decodes.

Data path (whisper_streaming's loop, with a VAD in front as in its ``VACOnlineASRProcessor``):
PCM chunks are resampled to 16 kHz (``audio_input.PcmInput``) and queued; a worker feeds them to
the ``VadSegmenter``; a decode loop runs, one call at a time per session:

* the **final** decode of every closed segment, in order (never skipped: no audio is lost);
* otherwise, every ``partial_interval_ms``, a **partial** decode of the open segment's audio so
  far, stabilised with LocalAgreement-2 (the committed prefix never changes).

Each decode is audio soft tokens + Decoder.Generate (thinking off, greedy) with the task's
instruction (``prompts``). A segment's soft tokens come from one AudioFrontend.EncodeStream: each
partial feeds it the audio since the last, and the final ends it at the segment's last sample (the
encoder redoes the few tokens that read past it), equal to Encode of the segment to ~1e-6; Encode
is the fallback when the stream fails. Each decode of a segment passes the segment's previous
hypothesis as its predicted output: successive hypotheses of a growing segment share most of their
tokens, and the decoder verifies the shared ones in one prefill run instead of a decode step each
(the text is the same as without the prediction). Backpressure: audio waiting beyond ``max_pending_audio_s``
pauses partials and sends a ``backlog`` warning; beyond three times that, new audio is refused
with an ``error`` event naming the refused span (explicit, never silent).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gemma_mesh.common.errors import BackendUnavailable, MeshError, Overloaded
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.captioning import (
    LocalAgreement,
    RepetitionGuard,
    SegmentClosed,
    SegmentStarted,
    SileroVad,
    VadSegmenter,
    VadSettings,
)
from gemma_mesh.gateway.clients import AudioEncodeStream, MeshClient
from gemma_mesh.gateway.live.latency import CaptionLatencyMonitor
from gemma_mesh.gateway.live.vad_batcher import StreamVad, VadBatcher
from gemma_mesh.gateway.mesh_types import PRIORITY_LIVE_CAPTION, ChatMessage, Part, Sampling, SoftTokens
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.prompts import context_text, transcription_instruction, translation_instruction
from gemma_mesh.gateway.protocol import (
    CaptionFinal,
    CaptionPartial,
    Error,
    SessionConfig,
    TranslationFinal,
    TranslationPartial,
)
from gemma_mesh.gateway.protocol import Warning as WarningEvent

log = get_logger(__name__)

RATE_HZ = 16000
DEFAULT_TOKENS_PER_AUDIO_S = 8.0
# How long a final waits for its segment's stream to end before encoding the segment whole instead.
FINAL_STREAM_TIMEOUT_S = 5.0
# A caption decode (or its encode) that fails because a backend replica went away mid-call is run
# again after these waits: the channel's round-robin has dropped the dead replica by then, so the
# retry lands on a live one. Greedy decoding gives the same text, and nothing was emitted for the
# failed try (captions wait for the whole answer), so a final is neither lost nor duplicated.
DECODE_RETRY_WAITS_S = (0.1, 0.5, 1.0)
# A caption decode is read whole (its partial is the text at the end), not token by token: the
# decoder sends its text every 8 tokens (vLLM's stream interval), a quarter of the gRPC messages on
# both sides. The repetition guard then looks every 8 tokens, so a looping decode runs at most 7
# tokens past the point it could have stopped (the guard cuts the loop from the text either way).
CAPTION_STREAM_INTERVAL_TOKENS = 8
_GUARD = RepetitionGuard()  # stateless: one for every decode
Emit = Callable[[object], Awaitable[None]]
_REASONS = {"silence": "silence", "max_length": "max_length", "flush": "end"}


@dataclass
class CaptionDecode:
    """One caption decode: ``text`` (through the ``RepetitionGuard``), the answer's ``token_ids`` as
    generated (a later decode's prediction), the completion tokens it cost and the audio soft
    tokens it read."""

    text: str
    token_ids: list[int]
    completion_tokens: int
    audio_tokens: int = 0
    # Mean log-probability of the answer's tokens (stop token excluded), when asked for; else None.
    avg_logprob: float | None = None


async def transcribe(
    clients: MeshClient,
    audio: np.ndarray,
    config: SessionConfig,
    max_tokens: int,
    *,
    tokens_per_audio_s: float = DEFAULT_TOKENS_PER_AUDIO_S,
    priority: int = PRIORITY_LIVE_CAPTION,
    prediction: Sequence[int] = (),
    context: str | None = None,
    logprobs: bool = False,
) -> CaptionDecode:
    """One decode of 16 kHz float32 mono ``audio`` for the session's task (``logprobs``: also its
    ``avg_logprob``, which does not change the text).

    The same call serves live finals and ``/v1/audio/transcriptions``, so both give the same text
    for the same audio; its output has been through the ``RepetitionGuard`` (loops cut; text
    without words becomes ""). The token budget grows with the audio: ``8 + tokens_per_audio_s`` per
    second, capped at ``max_tokens`` (speech runs at ~3-4 text tokens/s; the budget stops a
    looping decode early instead of running to the cap on every partial).
    """
    segments, _ = await clients.encode_audio(pcm_f32=audio, sample_rate_hz=RATE_HZ)
    return await caption_soft_tokens(
        clients,
        [s.soft_tokens for s in segments],
        audio.shape[0] / RATE_HZ,
        config,
        max_tokens,
        tokens_per_audio_s=tokens_per_audio_s,
        priority=priority,
        prediction=prediction,
        context=context,
        logprobs=logprobs,
    )


async def caption_soft_tokens(
    clients: MeshClient,
    soft_tokens: list[SoftTokens],
    audio_s: float,
    config: SessionConfig,
    max_tokens: int,
    *,
    tokens_per_audio_s: float = DEFAULT_TOKENS_PER_AUDIO_S,
    priority: int = PRIORITY_LIVE_CAPTION,
    prediction: Sequence[int] = (),
    context: str | None = None,
    logprobs: bool = False,
) -> CaptionDecode:
    """The decoder half of ``transcribe``: audio soft tokens (of ``audio_s`` seconds) -> caption.

    ``priority``: the decoder's scheduling priority (live captions first; the HTTP API passes
    ``PRIORITY_REQUEST``); it orders admission only, never changes the text. ``prediction``: token
    ids the answer is expected to start with (an earlier hypothesis of the same audio, grown
    since); it saves decode steps where right and never changes the text. A decode whose text
    ends in a loop (``RepetitionGuard.ends_in_loop``) is stopped there, and its caption is the
    guard's cut of the text so far: the loop and everything after it would be cut anyway (only when
    loops nest, a longer loop that starts earlier but would finish later, can the whole decode's
    cut fall earlier). Live finals and ``/v1/audio/transcriptions`` run this same function, so they
    agree. The tokens counted are those generated until the stop. ``context``: text the speech
    follows (OpenAI's transcription ``prompt``: earlier speech, names, terms), given before the
    audio (``prompts.context_text``); None = none."""
    budget = min(max_tokens, 8 + math.ceil(audio_s * tokens_per_audio_s))
    if config.task == "translate":
        instruction = translation_instruction(config.target_language or "en", config.source_language)
    else:
        instruction = transcription_instruction(config.source_language)
    parts = [Part(soft_tokens=t) for t in soft_tokens] + [Part(text=instruction)]
    if context:
        parts.insert(0, Part(text=context_text(context)))
    sampling = Sampling(
        max_tokens=budget,
        enable_thinking=False,
        priority=priority,
        prediction_ids=list(prediction),
        stream_interval_tokens=CAPTION_STREAM_INTERVAL_TOKENS,
        logprobs=0 if logprobs else None,
    )
    # Stop the decode once its text ends in a loop: everything from the loop on is cut by the guard
    # anyway, so a looping decode would only burn its budget.
    answer = await clients.stream_answer([ChatMessage("user", parts)], sampling, until=_GUARD.ends_in_loop)
    audio_tokens = sum(t.tokens.shape[0] for t in soft_tokens if t is not None and t.tokens.shape)
    avg = sum(answer.logprobs) / len(answer.logprobs) if answer.logprobs else None
    return CaptionDecode(
        _GUARD.clean(answer.text.strip()),
        answer.token_ids,
        answer.completion_tokens,
        audio_tokens=audio_tokens,
        avg_logprob=avg,
    )


class CaptionPipeline:
    """Captions (or translations) of one session's audio.

    Args:
        config: the session config (``task``, languages, ``partial_interval_ms``).
        emit: coroutine that appends an event to the session log and sends it.
        base_ms: the session's audio clock at the first sample fed here (non-zero on resume).
        first_segment_id: segment ids continue across reconnects.
        on_final: called after each final (the session saves its durable audio clock then).
        vad_batcher: the gateway's shared VAD (batched across sessions); None = a VAD of its own.
        latency_monitor: the gateway's ``CaptionLatencyMonitor`` (partial latencies of all sessions);
            its target is this pipeline's latency objective too. None = no objective.
        on_segment: awaited with ``(event, ms)`` when the VAD opens (``SegmentStarted``, ms of its
            first sample) or closes (``SegmentClosed``, ms of its last) a segment, before any
            caption of it is emitted or its final respectively (adapters that report speech
            start/stop, such as the Realtime API's, use it).
        context: text every decode is given before the audio (``caption_soft_tokens``).
        vad_settings, partial_interval_ms, max_tokens, max_pending_audio_s: from ``GatewaySettings``.
    """

    def __init__(
        self,
        *,
        clients: MeshClient,
        config: SessionConfig,
        emit: Emit,
        metrics: GatewayMetrics,
        vad_settings: VadSettings,
        partial_interval_ms: int,
        max_tokens: int,
        max_pending_audio_s: float,
        tokens_per_audio_s: float = DEFAULT_TOKENS_PER_AUDIO_S,
        base_ms: int = 0,
        first_segment_id: int = 0,
        on_final: Callable[[], Awaitable[None]] | None = None,
        vad_batcher: VadBatcher | None = None,
        latency_monitor: CaptionLatencyMonitor | None = None,
        on_segment: Callable[[SegmentStarted | SegmentClosed, int], Awaitable[None]] | None = None,
        context: str | None = None,
    ) -> None:
        self.clients = clients
        self.on_segment = on_segment
        self.context = context
        self.config = config
        self.emit = emit
        self.metrics = metrics
        self.partial_interval_s = (config.partial_interval_ms or partial_interval_ms) / 1000
        self.max_tokens = max_tokens
        self.tokens_per_audio_s = tokens_per_audio_s
        self.max_pending = int(max_pending_audio_s * RATE_HZ)
        self.base_ms = base_ms
        self.segment_offset = first_segment_id
        self._vad_batcher = vad_batcher
        self.latency_monitor = latency_monitor
        if vad_batcher is not None:
            self._vad_stream = vad_batcher.new_stream()
            self.segmenter = VadSegmenter(StreamVad(self._vad_stream), vad_settings)
        else:
            self.segmenter = VadSegmenter(SileroVad(vad_settings.model_path), vad_settings)
        self._audio: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self._pending_samples = 0  # received, not yet through the VAD
        self._received = 0  # samples received (relative to base_ms)
        self._covered = 0  # samples covered by a decode (or known to be non-speech)
        self._finals: deque[SegmentClosed] = deque()
        # The latest hypothesis' token ids of each segment not yet finalised: the next decode's prediction.
        self._hypotheses: dict[int, list[int]] = {}
        self._agreement: LocalAgreement | None = None
        self._partial_audio_end = 0  # samples of the open segment covered by the last partial
        self._stream: AudioEncodeStream | None = None  # the open segment's incremental encoding
        self._stream_fed = 0  # samples of the open segment sent to it
        # Closed segments' streams and the samples sent to each, until their finals end them.
        self._final_streams: dict[int, tuple[AudioEncodeStream, int]] = {}
        self._arrivals: deque[tuple[int, float]] = deque()  # (end sample, arrival time) not yet covered
        self._closed_at: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._vad_done = asyncio.Event()
        self._backlog_warned = False
        self.durable_ms = base_ms  # audio before this is captioned in finals (or was silence)
        self.next_segment_id = first_segment_id
        self.on_final = on_final
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the VAD worker and the decode loop."""
        self._tasks = [asyncio.create_task(self._vad_loop()), asyncio.create_task(self._decode_loop())]

    async def finish(self) -> None:
        """End of stream: close the open segment and wait until every final is sent."""
        await self._audio.put(None)
        await asyncio.gather(*self._tasks)

    def cancel(self) -> None:
        """Stop at once (connection lost without a flush is handled by ``finish``; this is for shutdown)."""
        for task in self._tasks:
            task.cancel()
        self._close_stream()
        for stream, _ in self._final_streams.values():
            stream.cancel()
        self._final_streams.clear()

    def behind(self) -> bool:
        """True while captions miss their latency objective, so camera-frame analyses wait: the
        session's recogniser lags by more than the objective (or two partial intervals, when the
        session asked for partials that far apart), or the gateway's recent partial latency across
        sessions misses it (their frames and these captions share the decoder and the CPU)."""
        monitor = self.latency_monitor
        if monitor is None:
            return self.pending_s > 2 * self.partial_interval_s + 1.0
        return self.pending_s > max(monitor.target_s, 2 * self.partial_interval_s) or monitor.over_target()

    @property
    def pending_s(self) -> float:
        """The recogniser's lag: audio received but not yet covered by a decode, in seconds."""
        return (self._received - self._covered) / RATE_HZ

    def update_config(self, config: SessionConfig) -> None:
        """Apply a ``session.update`` (task or languages take effect from the next decode)."""
        self.config = config
        if config.partial_interval_ms:
            self.partial_interval_s = config.partial_interval_ms / 1000

    # --- input ----------------------------------------------------------------------------
    async def push(self, audio: np.ndarray) -> None:
        """Queue 16 kHz float32 samples. Past ``max_pending_audio_s`` of lag the session gets its
        ``backlog`` warning here, so it always comes before any refusal.

        Raises:
            Overloaded: more than three times ``max_pending_audio_s`` is waiting; the chunk is refused.
        """
        if self._received - self._covered + audio.shape[0] > 3 * self.max_pending:
            await self._check_backlog()
            raise Overloaded(
                f"audio refused: {self.pending_s:.1f} s are waiting for the recogniser "
                f"(limit {3 * self.max_pending / RATE_HZ:.0f} s); slow down or resend later"
            )
        self._pending_samples += audio.shape[0]
        self._received += audio.shape[0]
        self.metrics.audio_seconds.inc(audio.shape[0] / RATE_HZ)
        self._audio.put_nowait(audio)
        if not self._backlog_warned:
            await self._check_backlog()

    def _ms(self, sample: int) -> int:
        return self.base_ms + sample * 1000 // RATE_HZ

    # --- VAD worker -----------------------------------------------------------------------
    async def _vad_loop(self) -> None:
        while True:
            chunk = await self._audio.get()
            if chunk is None:
                events = self.segmenter.flush()
            else:
                if self._vad_batcher is not None:  # one model call per window step for all sessions
                    probabilities = await self._vad_batcher.probabilities(self._vad_stream, chunk)
                    events = self.segmenter.push(chunk, probabilities)
                else:  # Silero runs ~31 windows per second of audio: cheap, but off the event loop
                    events = await asyncio.to_thread(self.segmenter.push, chunk)
                self._pending_samples -= chunk.shape[0]
                self._arrivals.append((self.segmenter.samples_pushed, time.monotonic()))
            for event in events:
                if self.on_segment is not None:
                    sample = event.start_sample if isinstance(event, SegmentStarted) else event.end_sample
                    await self.on_segment(event, self._ms(sample))
                if isinstance(event, SegmentStarted):
                    self._agreement = LocalAgreement()
                    self._partial_audio_end = 0
                    self._close_stream()
                    # A partial covers every sample received: the tokens not yet final come as a
                    # provisional tail (the clip so far, as Encode would end it).
                    self._stream = self.clients.encode_stream(RATE_HZ, provisional_tail=True)
                    self._stream_fed = 0
                elif isinstance(event, SegmentClosed):
                    self._closed_at[event.segment_id] = time.monotonic()
                    self._finals.append(event)
                    if self._stream is not None:  # its final ends it at the segment's last sample
                        self._final_streams[event.segment_id] = (self._stream, self._stream_fed)
                        self._stream = None

            if self.segmenter.open_segment_span is None and not self._finals:
                self.durable_ms = self._ms(self.segmenter.samples_pushed)
                self._covered = max(self._covered, self.segmenter.samples_pushed)
                self._arrivals.clear()
            self._wake.set()
            if chunk is None:
                self._close_stream()
                self._vad_done.set()
                return

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    # --- decode loop ----------------------------------------------------------------------
    async def _decode_loop(self) -> None:
        last_partial = 0.0
        while True:
            if self._finals:
                await self._final(self._finals.popleft())
                continue
            if self._vad_done.is_set():
                return
            await self._check_backlog()
            wait = self.partial_interval_s - (time.monotonic() - last_partial)
            span = self.segmenter.open_segment_span  # (copying the audio waits for a partial to run)
            if (
                wait <= 0
                and span is not None
                and not self._backlog_warned
                and span[2] - span[1] > self._partial_audio_end
            ):
                last_partial = time.monotonic()
                await self._partial(self.segmenter.open_segment)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.05))
            except TimeoutError:
                pass

    async def _check_backlog(self) -> None:
        behind = self._received - self._covered > self.max_pending
        if behind and not self._backlog_warned:
            self._backlog_warned = True
            await self._warn(
                "backlog",
                f"the recogniser is {self.pending_s:.1f} s behind: partial captions paused, "
                "finals continue, no audio is dropped",
            )
        elif not behind:
            self._backlog_warned = False

    async def _warn(self, code: str, message: str) -> None:
        self.metrics.warnings.labels(code).inc()
        await self.emit(WarningEvent(code=code, message=message, details={"pending_audio_s": self.pending_s}))

    async def _decode(
        self, segment_id: int, audio: np.ndarray, soft_tokens: SoftTokens | None = None
    ) -> str | None:
        """Caption ``audio`` of segment ``segment_id`` (from its soft tokens when given), predicting
        the segment's previous hypothesis; None after sending the error event of a failed decode."""
        options = dict(
            tokens_per_audio_s=self.tokens_per_audio_s,
            prediction=self._hypotheses.get(segment_id, ()),
            context=self.context,
        )
        try:
            for attempt, wait_s in enumerate((*DECODE_RETRY_WAITS_S, None)):
                try:
                    if soft_tokens is None:
                        decoded = await transcribe(
                            self.clients, audio, self.config, self.max_tokens, **options
                        )
                    else:
                        decoded = await caption_soft_tokens(
                            self.clients,
                            [soft_tokens],
                            audio.shape[0] / RATE_HZ,
                            self.config,
                            self.max_tokens,
                            **options,
                        )
                    break
                except BackendUnavailable as error:
                    if wait_s is None:
                        raise
                    log.info("caption decode retried", attempt=attempt + 1, error=error.message)
                    self.metrics.warnings.labels("caption_decode_retried").inc()
                    await asyncio.sleep(wait_s)
        except MeshError as error:
            self.metrics.errors.labels(error.code).inc()
            log.warning("caption decode failed", code=error.code, error=error.message)
            await self.emit(Error(code=error.code, message=error.message, param=error.param))
            return None
        self._hypotheses[segment_id] = decoded.token_ids
        self.metrics.tokens_generated.inc(decoded.completion_tokens)
        return decoded.text

    async def _partial(self, segment) -> None:
        """A partial decode of the open ``segment``'s audio so far, stabilised with LocalAgreement-2.

        A segment that closes while its partial decodes still gets that partial (clipped to the
        segment's end): its final comes next from this same loop, so the order holds, and the audio
        the partial covers is not left waiting for the final (VAD close plus a whole decode).
        """
        agreement = self._agreement  # this segment's: the next one may start while this decodes
        audio = segment.audio
        soft_tokens = None
        stream = self._stream
        span = self.segmenter.open_segment_span
        if stream is not None and stream.failed and span is not None and span[0] == segment.segment_id:
            # The audio replica went away: a new stream (the channel picks a live replica) is fed
            # the segment's audio so far from here, and partials go on from it.
            log.info("audio stream re-opened", segment_id=segment.segment_id)
            self.metrics.warnings.labels("audio_stream_reopened").inc()
            stream.cancel()
            stream = self._stream = self.clients.encode_stream(RATE_HZ, provisional_tail=True)
            self._stream_fed = 0
        if stream is not None and not stream.failed:
            # Feed the incremental encoder what arrived since the last partial, in one step (each
            # step also re-reads a fixed left context: fewer, larger steps cost less), and wait for
            # the tokens that audio makes final (40 ms each, final once the next 40 ms arrived).
            stream.send(audio[self._stream_fed :])
            self._stream_fed = audio.shape[0]
            await stream.wait_caught_up(timeout_s=1.0)
            if stream.covered_ms > 0 and not stream.failed:
                soft_tokens = stream.soft_tokens()
                audio = audio[: stream.covered_ms * RATE_HZ // 1000]
        text = await self._decode(segment.segment_id, audio, soft_tokens)
        if text is None or agreement is None:
            return
        still_open = self.segmenter.open_segment_span
        end_sample = segment.start_sample + audio.shape[0]
        if still_open is not None and still_open[0] == segment.segment_id:
            self._partial_audio_end = audio.shape[0]
        else:  # closed meanwhile: the partial covers no more than the segment does
            closed = next((c for c in self._finals if c.segment_id == segment.segment_id), None)
            if closed is None:
                return  # its final was sent already
            end_sample = min(end_sample, closed.end_sample)
        result = agreement.update(text)
        if not result.committed and not result.tentative:
            return
        self._covered = max(self._covered, end_sample)
        now = time.monotonic()
        while self._arrivals and self._arrivals[0][0] <= end_sample:
            latency = now - self._arrivals.popleft()[1]
            self.metrics.partial_latency.observe(latency)
            if self.latency_monitor is not None:
                self.latency_monitor.observe(latency)
        common = dict(
            segment_id=self.segment_offset + segment.segment_id,
            start_ms=self._ms(segment.start_sample),
            end_ms=self._ms(end_sample),
            text=" ".join(p for p in (result.committed, result.tentative) if p),
            committed=result.committed,
            tentative=result.tentative,
        )
        if self.config.task == "translate":
            await self.emit(TranslationPartial(language=self.config.target_language or "", **common))
        else:
            await self.emit(CaptionPartial(**common))

    async def _final_soft_tokens(self, segment: SegmentClosed) -> SoftTokens | None:
        """The closed segment's soft tokens from its incremental encoding: the stream is sent what
        partials did not feed it and ended at the segment's last sample (tokens that read the
        silence after it are encoded again), equal to ``Encode`` of the segment to ~1e-6 and
        bitwise equal to its partials' tokens up to there (the decoder reuses their KV). None when
        the stream failed or ran further past the end than the audio service rewinds."""
        handoff = self._final_streams.pop(segment.segment_id, None)
        if handoff is None:
            return None
        stream, fed = handoff
        if stream.failed:
            stream.cancel()
            return None
        stream.send(segment.audio[fed:])
        return await stream.finish(segment.audio.shape[0], timeout_s=FINAL_STREAM_TIMEOUT_S)

    async def _final(self, segment: SegmentClosed) -> None:
        soft_tokens = await self._final_soft_tokens(segment)
        text = await self._decode(segment.segment_id, segment.audio, soft_tokens)
        self._hypotheses.pop(segment.segment_id, None)
        closed_at = self._closed_at.pop(segment.segment_id, time.monotonic())
        self.next_segment_id = self.segment_offset + segment.segment_id + 1
        if text:
            common = dict(
                segment_id=self.segment_offset + segment.segment_id,
                start_ms=self._ms(segment.start_sample),
                end_ms=self._ms(segment.end_sample),
                text=text,
                reason=_REASONS[segment.reason],
            )
            if self.config.task == "translate":
                await self.emit(TranslationFinal(language=self.config.target_language or "", **common))
            else:
                await self.emit(CaptionFinal(**common))
            self.metrics.final_latency.observe(time.monotonic() - closed_at)
        span = self.segmenter.open_segment_span
        if self._finals:
            self.durable_ms = self._ms(self._finals[0].start_sample)
        elif span is not None:
            self.durable_ms = self._ms(span[1])
        elif self._vad_done.is_set():  # end of stream: every sample is decided, the rest was silence
            self.durable_ms = self._ms(self.segmenter.samples_pushed)
            self._covered = max(self._covered, self.segmenter.samples_pushed)
        else:
            self.durable_ms = self._ms(segment.end_sample)
            self._covered = max(self._covered, self.segmenter.samples_pushed)
        self._covered = max(self._covered, segment.end_sample)
        if self.on_final is not None:
            await self.on_final()
