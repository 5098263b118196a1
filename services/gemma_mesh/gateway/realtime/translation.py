"""``WS /v1/realtime/translations``: live speech translation sessions (the SDK's
``client.realtime.translations.connect``), an adapter over the live caption pipeline.

The translation is a ``CaptionPipeline`` with task ``translate`` (the ``/v1/stream`` translate
task: the same VAD segments, LocalAgreement partials and final decodes); its committed text
becomes ``session.output_transcript.delta`` events (append-only, ``events.AppendOnlyText``).
With ``audio.input.transcription`` set, a second pipeline of task ``transcribe`` over the same
audio (the same VAD settings, so the same segments) gives ``session.input_transcript.delta``.
``elapsed_ms`` is the end, on the session's audio clock, of the audio the delta's text covers.
The model writes text: no ``session.output_audio.delta`` is ever sent.

``session.update`` sets ``audio.output.language`` (needed before the first append; a change
applies from the next decode) and ``audio.input.transcription``; ``noise_reduction`` is accepted
and not applied. ``session.close`` decodes what was received, sends ``session.closed`` and closes.
"""

from __future__ import annotations

import time

from openai.types.realtime.realtime_translation_session_closed_event import (
    RealtimeTranslationSessionClosedEvent,
)
from pydantic import ValidationError

from gemma_mesh.common.errors import InvalidRequest, MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.live.captions import CaptionPipeline
from gemma_mesh.gateway.prompts import normalize_language
from gemma_mesh.gateway.protocol import (
    CaptionFinal,
    CaptionPartial,
    Error,
    SessionConfig,
    TranslationFinal,
    TranslationPartial,
)
from gemma_mesh.gateway.realtime import events as rt
from gemma_mesh.gateway.realtime.connection import RealtimeConnection
from gemma_mesh.gateway.realtime.protocol import (
    TRANSLATION_CLIENT_EVENT,
    TRANSLATION_EVENT_TYPES,
    TranslationSession,
    dump,
    dump_session,
    merge,
    new_id,
)
from gemma_mesh.gateway.realtime.transcription import decode_append, pcm_input

log = get_logger(__name__)


class TranslationConnection(RealtimeConnection):
    client_events = TRANSLATION_CLIENT_EVENT
    event_types = TRANSLATION_EVENT_TYPES
    kind = "translation"

    def __init__(self, websocket, app_state) -> None:
        super().__init__(websocket, app_state)
        model = websocket.query_params.get("model") or self.settings.served_model_name
        self.config = TranslationSession(id=new_id("sess"), model=model)
        self.pcm = pcm_input(self.config.audio.input.format, self.settings)
        self.output = rt.AppendOnlyText()
        self.input = rt.AppendOnlyText()
        self.translate: CaptionPipeline | None = None
        self.transcribe: CaptionPipeline | None = None

    async def open(self) -> None:
        self.config.expires_at = int(time.time()) + self.settings.max_session_s
        await self.send(dump_session("session.created", self.config))

    def _pipeline(self, config: SessionConfig, base_ms: int = 0) -> CaptionPipeline:
        """A caption pipeline over this session's audio from ``base_ms`` (the audio clock) on."""
        pipeline = CaptionPipeline(
            clients=self.state.clients,
            config=config,
            emit=self._on_caption,
            metrics=self.metrics,
            vad_settings=self.state.vad_settings,
            partial_interval_ms=self.settings.partial_interval_ms,
            max_tokens=self.settings.max_caption_tokens,
            max_pending_audio_s=self.settings.max_pending_audio_s,
            tokens_per_audio_s=self.settings.caption_tokens_per_audio_s,
            base_ms=base_ms,
            vad_batcher=self.state.vad_batcher,
            latency_monitor=self.state.caption_latency,
        )
        pipeline.start()
        return pipeline

    async def handle(self, event) -> None:
        if event.type == "session.update":
            await self._update(event.session)
        elif event.type == "session.input_audio_buffer.append":
            await self._append(event.audio)
        else:  # session.close
            await self.finish()
            await self.send(
                dump(RealtimeTranslationSessionClosedEvent(type="session.closed", event_id=new_id("event")))
            )
            self._closing = True

    async def _update(self, changes: dict) -> None:
        """Raises InvalidRequest: a field that does not validate, an unknown output language, a
        new input format after audio was appended."""
        for fixed in ("type", "model", "id"):
            if fixed in changes and changes[fixed] != getattr(self.config, fixed):
                raise InvalidRequest(
                    f"session.{fixed} is set at creation and cannot change", param=f"session.{fixed}"
                )
        try:
            config = TranslationSession.model_validate(merge(self.config.model_dump(), changes))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "session." + ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"session.update: {where}: {first['msg']}", param=where) from None
        language = config.audio.output.language
        if language:
            config.audio.output.language = normalize_language(language, param="session.audio.output.language")
        if config.audio.input.format != self.config.audio.input.format:
            if self.translate is not None:
                raise InvalidRequest(
                    "the input format cannot change after audio was appended",
                    param="session.audio.input.format",
                )
            self.pcm = pcm_input(config.audio.input.format, self.settings)
        self.config = config
        if self.translate is not None:
            self.translate.update_config(self._translate_config())
        if self.transcribe is None and self.translate is not None and config.audio.input.transcription:
            log.info("input transcription turned on mid-session: it starts with the next audio")
            self.transcribe = self._pipeline(SessionConfig(task="transcribe"), base_ms=self.pcm.clock_ms)
        await self.send(dump_session("session.updated", config))

    def _translate_config(self) -> SessionConfig:
        return SessionConfig(task="translate", target_language=self.config.audio.output.language)

    async def _append(self, audio_b64: str) -> None:
        if not self.config.audio.output.language:
            raise InvalidRequest(
                "set session.audio.output.language (the target language) before appending audio",
                param="session.audio.output.language",
            )
        samples = decode_append(audio_b64, self.pcm)
        if self.translate is None:
            self.translate = self._pipeline(self._translate_config())
            if self.config.audio.input.transcription is not None:
                self.transcribe = self._pipeline(SessionConfig(task="transcribe"))
        await self.translate.push(samples)
        if self.transcribe is not None:
            await self.transcribe.push(samples)

    async def finish(self) -> None:
        if self.translate is None and self.transcribe is None:
            return  # nothing appended, or finished already (session.close, then the disconnect)
        tail = self.pcm.flush()
        for pipeline in (self.translate, self.transcribe):
            if pipeline is not None:
                if tail.size:
                    await pipeline.push(tail)
                await pipeline.finish()
        self.translate = self.transcribe = None

    async def _on_caption(self, event) -> None:
        partial = isinstance(event, TranslationPartial | CaptionPartial)
        if isinstance(event, TranslationPartial | TranslationFinal):
            stream, kind = self.output, "output"
        elif isinstance(event, CaptionPartial | CaptionFinal):
            stream, kind = self.input, "input"
        elif isinstance(event, Error):
            error = MeshError(event.message, param=event.param)
            error.code = event.code
            await self.send_error(error)
            return
        else:
            log.info("caption pipeline warning", session_id=self.session_id, event=event.model_dump())
            return
        delta = stream.advance(event.segment_id, event.committed if partial else event.text)
        if delta:
            await self.send(rt.translation_delta(kind, delta, event.end_ms))
