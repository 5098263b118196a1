"""Transcriptions and translations of uploaded audio files (vLLM's ``OpenAIServingTranscription``).

Split from ``serving.py`` (chat and models), as vLLM splits ``serving_chat.py`` and
``serving_transcription.py``; the same rules hold: parsed request in, response model or text out,
errors raised as the mesh's classes.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import AsyncIterator, Coroutine

import numpy as np

from gemma_mesh.common.errors import InvalidRequest, MeshError, PayloadTooLarge
from gemma_mesh.gateway.captioning import (
    SegmentClosed,
    SileroVad,
    VadSegmenter,
    VadSettings,
)
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.live.captions import RATE_HZ, CaptionDecode, transcribe
from gemma_mesh.gateway.mesh_types import PRIORITY_REQUEST
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.openai.protocol import (
    TranscriptionRequest,
    TranscriptionResponse,
    TranscriptionResponseVerbose,
    TranscriptionSegment,
    TranscriptionUsage,
    TranscriptTextDelta,
    TranscriptTextDone,
    TranscriptTokenDetails,
    TranscriptTokenUsage,
)
from gemma_mesh.gateway.openai.serving import check_model, error_event, gather_or_cancel, sse
from gemma_mesh.gateway.prompts import language_name, normalize_language
from gemma_mesh.gateway.protocol import SessionConfig
from gemma_mesh.gateway.settings import GatewaySettings
from gemma_mesh.model.audio_io import decode_audio

MAX_CONCURRENT_SEGMENT_DECODES = 4  # VAD segments of one upload decoded at once (the decoder batches)
VAD_PUSH_SAMPLES = 10 * RATE_HZ  # upload audio goes through the VAD in 10 s pieces


def _timestamp(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_srt(segments: list[TranscriptionSegment]) -> str:
    """SubRip: numbered cues from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    return "".join(
        f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n\n"
        for n, s in enumerate(segments, start=1)
    )


def to_vtt(segments: list[TranscriptionSegment]) -> str:
    """WebVTT: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    cues = "".join(f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n\n" for s in segments)
    return f"WEBVTT\n\n{cues}"


def compression_ratio(text: str) -> float:
    """Whisper's: UTF-8 bytes over zlib-compressed bytes (high = repetitive)."""
    raw = text.encode()
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


class OpenAIServingTranscription:
    """``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (vLLM's ``OpenAIServingTranscription``).

    The file is decoded to 16 kHz mono (WAV, FLAC, MP3, OGG, WebM, anything FFmpeg reads). Audio up
    to the VAD's ``max_segment_ms`` (30 s) is one segment, decoded whole; longer audio is cut by the
    same Silero VAD segmenter as live captions (segments close on silence or are split at the
    quietest point at 30 s; non-speech between segments is skipped, nothing is truncated). Every
    segment is decoded with ``live.captions.transcribe``, the live final-caption decode, and cleaned
    by the same ``RepetitionGuard`` (decoder loops cut; a segment left without words is dropped, as
    live finals are), so a file gives exactly the text of live captions of the same audio.
    Translations translate into English.

    Limits: ``max_upload_bytes`` (413), ``max_audio_s`` (400, from the file's header when it has the
    length); per segment the live captions' token budget (``max_caption_tokens``,
    ``caption_tokens_per_audio_s``), so the texts agree.
    """

    def __init__(
        self,
        clients: MeshClient,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        vad_settings: VadSettings,
    ) -> None:
        self.clients = clients
        self.settings = settings
        self.metrics = metrics
        self.vad_settings = vad_settings

    async def create_transcription(
        self, data: bytes, request: TranscriptionRequest, task: str = "transcribe"
    ) -> TranscriptionResponse | TranscriptionResponseVerbose | str | AsyncIterator[str]:
        """``task`` ``transcribe`` or ``translate`` -> the response model (json, verbose_json), the
        text of a plain format (text, srt, vtt), or with ``stream`` the SSE lines (``stream_events``).

        Raises:
            NotFound: unknown model. PayloadTooLarge: over ``max_upload_bytes``.
            InvalidRequest: bad language tag, undecodable or over-long audio, ``stream`` for a
                translation (OpenAI's translations do not stream).
        """
        check_model(request.model, self.settings.served_model_name)
        if request.stream and task != "transcribe":
            raise InvalidRequest("stream: translations are not streamed", param="stream")
        if len(data) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"file is {len(data)} bytes; the limit is {self.settings.max_upload_bytes} bytes (max_upload_bytes)",
                param="file",
            )
        source = normalize_language(request.language, param="language") if request.language else None
        if task == "translate":
            config = SessionConfig(task="translate", source_language=source, target_language="en")
            language = "english"
        else:
            config = SessionConfig(task="transcribe", source_language=source)
            language = language_name(source, param="language").lower() if source else "unknown"
        try:
            audio = await asyncio.to_thread(
                decode_audio, data, RATE_HZ, max_duration_s=self.settings.max_audio_s
            )
        except InvalidRequest as error:
            raise InvalidRequest(f"file: {error.message}", param="file") from None
        duration_s = audio.shape[0] / RATE_HZ
        spans = await self._segments(audio)
        if request.stream:
            return self.stream_events(spans, config, request.prompt)
        verbose = request.response_format == "verbose_json"
        decodes = await gather_or_cancel(*self._decodes(spans, config, request.prompt, logprobs=verbose))
        segments = [
            TranscriptionSegment(
                id=n,
                seek=start * 100 // RATE_HZ,
                start=round(start / RATE_HZ, 3),
                end=round(end / RATE_HZ, 3),
                text=decode.text,
                compression_ratio=compression_ratio(decode.text),
                avg_logprob=decode.avg_logprob,
            )
            for n, ((start, end, _), decode) in enumerate(
                (s, d) for s, d in zip(spans, decodes, strict=True) if d.text
            )
        ]
        text = " ".join(s.text for s in segments)
        usage = TranscriptionUsage(seconds=math.ceil(duration_s))
        fmt = request.response_format
        if fmt == "json":
            return TranscriptionResponse(text=text, usage=usage)
        if fmt == "verbose_json":
            return TranscriptionResponseVerbose(
                task=task,
                language=language,
                duration=round(duration_s, 3),
                text=text,
                segments=segments,
                usage=usage,
            )
        if fmt == "srt":
            return to_srt(segments)
        if fmt == "vtt":
            return to_vtt(segments)
        return text + "\n"

    async def _segments(self, audio: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """``(start_sample, end_sample, audio)`` of each speech segment: none when the VAD hears no
        speech (silence and noise give no text, as in live captions), the whole clip when it fits in
        one segment (so a live final's audio transcribes to the same text), else the VAD's segments."""
        max_samples = self.vad_settings.max_segment_ms * RATE_HZ // 1000
        closed = await asyncio.to_thread(self._run_vad, audio)
        if not closed:
            return []
        if audio.shape[0] <= max_samples:
            return [(0, audio.shape[0], audio)]
        return [(c.start_sample, c.end_sample, c.audio) for c in closed if c.end_sample > c.start_sample]

    def _run_vad(self, audio: np.ndarray) -> list[SegmentClosed]:
        segmenter = VadSegmenter(SileroVad(self.vad_settings.model_path), self.vad_settings)
        events = []
        for begin in range(0, audio.shape[0], VAD_PUSH_SAMPLES):
            events += segmenter.push(audio[begin : begin + VAD_PUSH_SAMPLES])
        events += segmenter.flush()
        return [e for e in events if isinstance(e, SegmentClosed)]

    def _decodes(
        self,
        spans: list[tuple[int, int, np.ndarray]],
        config: SessionConfig,
        prompt: str | None,
        *,
        logprobs: bool = False,
    ) -> list[Coroutine[None, None, CaptionDecode]]:
        """One decode per segment (``live.captions.transcribe``), at most
        ``MAX_CONCURRENT_SEGMENT_DECODES`` at once (``logprobs``: each with its ``avg_logprob``)."""
        limit = asyncio.Semaphore(MAX_CONCURRENT_SEGMENT_DECODES)

        async def one(audio: np.ndarray) -> CaptionDecode:
            async with limit:
                decoded = await transcribe(
                    self.clients,
                    audio,
                    config,
                    self.settings.max_caption_tokens,
                    tokens_per_audio_s=self.settings.caption_tokens_per_audio_s,
                    priority=PRIORITY_REQUEST,
                    context=prompt,
                    logprobs=logprobs,
                )
            self.metrics.tokens_generated.inc(decoded.completion_tokens)
            return decoded

        return [one(audio) for _, _, audio in spans]

    async def stream_events(
        self, spans: list[tuple[int, int, np.ndarray]], config: SessionConfig, prompt: str | None
    ) -> AsyncIterator[str]:
        """SSE lines as OpenAI streams a transcription: ``data: {"type": "transcript.text.delta",
        "delta"}`` per segment with words, in order (segments decode concurrently; each is sent as
        soon as it and those before it are done), then ``transcript.text.done`` with the text (the
        deltas joined: the non-streamed ``text``) and token usage. A failure mid-stream is an SSE
        ``error`` event (OpenAI's error body). Closing the generator cancels the decodes left."""
        tasks = [asyncio.ensure_future(c) for c in self._decodes(spans, config, prompt)]
        texts: list[str] = []
        audio_tokens = output_tokens = 0
        try:
            for task in tasks:
                decoded = await task
                audio_tokens += decoded.audio_tokens
                output_tokens += decoded.completion_tokens
                if decoded.text:
                    delta = decoded.text if not texts else " " + decoded.text
                    texts.append(decoded.text)
                    yield _sse(TranscriptTextDelta(delta=delta))
            usage = TranscriptTokenUsage(
                input_tokens=audio_tokens,
                output_tokens=output_tokens,
                total_tokens=audio_tokens + output_tokens,
                input_token_details=TranscriptTokenDetails(audio_tokens=audio_tokens),
            )
            yield _sse(TranscriptTextDone(text=" ".join(texts), usage=usage))
        except MeshError as error:
            self.metrics.errors.labels(error.code).inc()
            yield error_event(error)
        finally:
            for task in tasks:
                task.cancel()


def _sse(event) -> str:
    return sse(event.model_dump_json())
