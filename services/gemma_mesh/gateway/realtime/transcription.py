"""``WS /v1/realtime`` transcription sessions (``intent=transcription``): an adapter over the live
caption pipeline of ``/v1/stream``.

* ``server_vad`` (the default, with the gateway's VAD settings): appended audio goes to a ``CaptionPipeline`` (the same Silero VAD
  segmenter, LocalAgreement partials, streaming encoder and final decode as ``/v1/stream``), whose
  VAD settings take the turn detection's ``threshold`` (onset), ``prefix_padding_ms`` (the pad kept
  before and after speech) and ``silence_duration_ms`` (the silence that ends a turn). Each VAD
  segment is one item (``events.TranscriptionTurns``). ``input_audio_buffer.commit`` ends the
  current turn now (the open segment gets its final); ``clear`` drops the audio not yet in a
  stopped turn.
* ``turn_detection: null`` (manual commits): appended audio is buffered; ``commit`` makes it one
  item, decoded with ``live.captions.transcribe`` (the decode of every live final and of
  ``/v1/audio/transcriptions``): one ``delta`` with the text, then ``completed``.

Audio is ``audio/pcm`` (PCM16 mono) at 24 kHz or 16 kHz, resampled with soxr (``PcmInput``) to the
model's rate (``live.captions.RATE_HZ``). The audio clock of every ``*_ms`` field is the client's.
Limits: one append carries at most ``max_audio_chunk_ms``; a manual buffer at most the VAD's
``max_segment_ms`` (one decode, like one VAD segment); ``max_pending_audio_s`` as in ``/v1/stream``.
``clear`` under ``server_vad`` stops the pipeline at once: turns stopped but not yet completed get
``conversation.item.input_audio_transcription.failed``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

import numpy as np
from pydantic import ValidationError

from gemma_mesh.common.errors import InvalidRequest, MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.audio_input import PcmInput
from gemma_mesh.gateway.captioning import SegmentStarted
from gemma_mesh.gateway.live.captions import RATE_HZ, CaptionPipeline, transcribe
from gemma_mesh.gateway.prompts import normalize_language
from gemma_mesh.gateway.protocol import AudioConfig, CaptionFinal, CaptionPartial, SessionConfig
from gemma_mesh.gateway.protocol import Error as CaptionError
from gemma_mesh.gateway.realtime import events as rt
from gemma_mesh.gateway.realtime.connection import RealtimeConnection
from gemma_mesh.gateway.realtime.protocol import (
    TRANSCRIPTION_CLIENT_EVENT,
    TRANSCRIPTION_EVENT_TYPES,
    AudioFormat,
    ServerVad,
    SessionUpdate,
    TranscriptionAudio,
    TranscriptionInput,
    TranscriptionSession,
    dump_session,
    merge,
)

log = get_logger(__name__)


def decode_append(audio_b64: str, pcm: PcmInput) -> np.ndarray:
    """An append's base64 PCM16 -> float32 samples at the model's rate.

    Raises:
        InvalidRequest (param ``audio``): not base64, not whole PCM16 frames, longer than
            ``max_audio_chunk_ms``.
    """
    try:
        data = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("audio is not valid base64", param="audio") from None
    try:
        return pcm.decode(data)
    except InvalidRequest as error:
        raise InvalidRequest(f"audio: {error.message}", param="audio") from None


def pcm_input(fmt: AudioFormat, settings) -> PcmInput:
    return PcmInput(
        AudioConfig(encoding="pcm_s16le", sample_rate_hz=fmt.rate, channels=1),
        RATE_HZ,
        settings.max_audio_chunk_ms,
    )


class TranscriptionConnection(RealtimeConnection):
    client_events = TRANSCRIPTION_CLIENT_EVENT
    event_types = TRANSCRIPTION_EVENT_TYPES
    kind = "transcription"

    def __init__(self, websocket, app_state) -> None:
        super().__init__(websocket, app_state)
        # Turn detection defaults to the gateway's own VAD settings (those of /v1/stream).
        vad = app_state.vad_settings
        default_vad = ServerVad(
            threshold=vad.onset_threshold,
            prefix_padding_ms=vad.speech_pad_ms,
            silence_duration_ms=vad.min_silence_ms,
        )
        self.config = TranscriptionSession(
            audio=TranscriptionAudio(input=TranscriptionInput(turn_detection=default_vad))
        )
        self.pcm = pcm_input(self.config.audio.input.format, self.settings)
        self.pipeline: CaptionPipeline | None = None
        self.turns = rt.TranscriptionTurns()
        self._base_ms = 0  # the client's audio clock where the current pipeline or buffer starts
        self._next_segment = 0  # segment ids go on across pipelines: items never collide
        self._segment_offset = 0  # the current pipeline's first segment id
        self._buffer: list[np.ndarray] = []  # manual mode: audio since the last commit
        self._buffered = 0
        self._last_item: str | None = None
        self._decodes: asyncio.Queue = asyncio.Queue()  # manual mode: committed buffers, in order
        self._decoder: asyncio.Task | None = None

    # --- session ------------------------------------------------------------------------------
    async def open(self) -> None:
        self._start()
        await self.send(dump_session("session.created", self.config))

    def _caption_config(self) -> SessionConfig:
        language = self.config.audio.input.transcription.language
        return SessionConfig(
            source_language=normalize_language(language, param="language") if language else None
        )

    def _start(self) -> None:
        """Start receiving audio under the current configuration (a pipeline, or a manual buffer)."""
        self.pcm = pcm_input(self.config.audio.input.format, self.settings)
        vad = self.config.audio.input.turn_detection
        if vad is None:
            self.pipeline = None
            if self._decoder is None:
                self._decoder = asyncio.create_task(self._manual_decoder())
            return
        self._segment_offset = self._next_segment
        base = self.state.vad_settings
        vad_settings = base.model_copy(
            update={
                "onset_threshold": vad.threshold,
                "offset_threshold": min(base.offset_threshold, vad.threshold),
                "speech_pad_ms": vad.prefix_padding_ms,
                "min_silence_ms": vad.silence_duration_ms,
            }
        )
        self.pipeline = CaptionPipeline(
            clients=self.state.clients,
            config=self._caption_config(),
            emit=self._on_caption,
            metrics=self.metrics,
            vad_settings=vad_settings,
            partial_interval_ms=self.settings.partial_interval_ms,
            max_tokens=self.settings.max_caption_tokens,
            max_pending_audio_s=self.settings.max_pending_audio_s,
            tokens_per_audio_s=self.settings.caption_tokens_per_audio_s,
            base_ms=self._base_ms,
            on_final=self._on_final,
            vad_batcher=self.state.vad_batcher,
            latency_monitor=self.state.caption_latency,
            first_segment_id=self._segment_offset,
            on_segment=self._on_segment,
            context=self.config.audio.input.transcription.prompt,
        )
        self.pipeline.start()

    async def _stop(self) -> None:
        """End the current pipeline: its open segment is closed and decoded (every final is sent)."""
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            tail = self.pcm.flush()
            if tail.size:
                await pipeline.push(tail)
            await pipeline.finish()
        self._base_ms += self.pcm.clock_ms

    async def finish(self) -> None:
        await self._stop()
        if self._decoder is not None:
            await self._decodes.put(None)
            await self._decoder

    # --- client events ------------------------------------------------------------------------
    async def handle(self, event) -> None:
        kind = event.type
        if kind == "input_audio_buffer.append":
            await self._append(event.audio)
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        elif kind == "input_audio_buffer.clear":
            await self._clear()
        else:
            await self._update(event)

    async def _update(self, event: SessionUpdate) -> None:
        """Merge the fields sent into the session; a new format or turn detection applies to the
        audio appended after it (the current turn is ended first, as a commit would).

        Raises:
            InvalidRequest: a field that does not validate, a ``realtime`` (conversation) session,
                an unknown language; the session keeps its configuration.
        """
        if event.session.get("type", "transcription") != "transcription":
            raise InvalidRequest(
                "only transcription sessions are served (session.type 'transcription'): the model "
                "writes text, it does not hold spoken conversations",
                param="session.type",
            )
        try:
            config = TranscriptionSession.model_validate(merge(self.config.model_dump(), event.session))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "session." + ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"session.update: {where}: {first['msg']}", param=where) from None
        language = config.audio.input.transcription.language
        if language:
            normalize_language(language, param="session.audio.input.transcription.language")
        restart = (
            config.audio.input.format != self.config.audio.input.format
            or config.audio.input.turn_detection != self.config.audio.input.turn_detection
        )
        self.config = config
        if restart:
            await self._stop()
            self._buffer, self._buffered = [], 0
            self._start()
        elif self.pipeline is not None:
            self.pipeline.update_config(self._caption_config())
            self.pipeline.context = config.audio.input.transcription.prompt
        await self.send(dump_session("session.updated", config))

    async def _append(self, audio_b64: str) -> None:
        samples = decode_append(audio_b64, self.pcm)
        if self.pipeline is not None:
            await self.pipeline.push(samples)
            return
        limit = self.state.vad_settings.max_segment_ms * RATE_HZ // 1000
        if self._buffered + samples.shape[0] > limit:
            raise InvalidRequest(
                f"the input audio buffer would exceed {limit // RATE_HZ} s (the VAD's max_segment_ms): "
                "commit it first",
                param="audio",
            )
        self._buffer.append(samples)
        self._buffered += samples.shape[0]

    async def _commit(self) -> None:
        if self.pipeline is not None:  # server VAD: end the current turn now
            await self._stop()
            self._start()
            return
        # The resampler's last samples end the item; the next item's audio starts a new stream.
        audio = np.concatenate([*self._buffer, self.pcm.flush()])
        self.pcm = pcm_input(self.config.audio.input.format, self.settings)
        self._buffer, self._buffered = [audio], audio.shape[0]
        min_samples = RATE_HZ // 10
        if audio.shape[0] < min_samples:
            raise InvalidRequest(
                f"buffer too small: expected at least 100 ms of audio, got {audio.shape[0] * 1000 // RATE_HZ} ms",
                param="audio",
            )
        item_id = rt.new_id("item")
        await self.send(rt.dump(rt.committed(item_id, self._last_item)))
        self._last_item = item_id
        self._buffer, self._buffered = [], 0
        await self._decodes.put(
            (item_id, audio, self._caption_config(), self.config.audio.input.transcription.prompt)
        )

    async def _clear(self) -> None:
        if self.pipeline is not None:
            self.pipeline.cancel()
            self.pipeline = None
            await self.send(*self.turns.drop_pending())
            self._base_ms += self.pcm.clock_ms
            self._start()
        else:
            self._buffer, self._buffered = [], 0
            self.pcm = pcm_input(self.config.audio.input.format, self.settings)
        await self.send(rt.cleared())

    async def _manual_decoder(self) -> None:
        """Decode committed buffers one at a time, in commit order."""
        while (job := await self._decodes.get()) is not None:
            item_id, audio, config, prompt = job
            try:
                decoded = await transcribe(
                    self.state.clients,
                    audio,
                    config,
                    self.settings.max_caption_tokens,
                    tokens_per_audio_s=self.settings.caption_tokens_per_audio_s,
                    context=prompt,
                )
            except MeshError as error:
                await self.send_error(error)
                continue
            self.metrics.tokens_generated.inc(decoded.completion_tokens)
            events = [rt.delta_event(item_id, decoded.text)] if decoded.text else []
            await self.send(*events, rt.completed(item_id, decoded.text, audio.shape[0] / RATE_HZ))

    # --- pipeline events ----------------------------------------------------------------------
    async def _on_segment(self, event, ms: int) -> None:
        # The pipeline's caption events carry its segment ids plus its first one; its VAD events do not.
        segment_id = self._segment_offset + event.segment_id
        if isinstance(event, SegmentStarted):
            self._next_segment = segment_id + 1
            await self.send(*self.turns.started(segment_id, ms))
        else:
            await self.send(*self.turns.stopped(segment_id, ms))

    async def _on_caption(self, event) -> None:
        if isinstance(event, CaptionPartial):
            await self.send(*self.turns.partial(event.segment_id, event.committed))
        elif isinstance(event, CaptionFinal):
            await self.send(*self.turns.final(event.segment_id, event.text))
        elif isinstance(event, CaptionError):  # a decode failed: the session goes on
            error = MeshError(event.message, param=event.param)
            error.code = event.code
            await self.send_error(error)
        else:  # warnings (backlog) have no Realtime event: logged
            log.info("caption pipeline warning", session_id=self.session_id, event=event.model_dump())

    async def _on_final(self) -> None:
        await self.send(*self.turns.final_done())
