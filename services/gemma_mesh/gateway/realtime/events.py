"""Caption pipeline events -> Realtime API server events (pure: no sockets, no clocks).

The live pipeline (``live.captions.CaptionPipeline``) reports VAD segments and, per segment,
partials (LocalAgreement-2: a ``committed`` prefix that never changes, then a ``tentative`` tail)
and one final decode. The Realtime API wants append-only text per item:

* ``AppendOnlyText`` turns the committed prefixes of successive partials, then the final, into
  deltas: each delta extends what was sent, so deltas concatenate to the committed text. A final
  that extends the committed text sends the rest; a final that disagrees with it (the final decode
  heard more audio) sends nothing more: sent text is never taken back, and ``completed`` carries
  the final text whole.
* ``TranscriptionTurns`` maps segments to conversation items (``item_…``): SegmentStarted ->
  ``input_audio_buffer.speech_started``; SegmentClosed -> ``speech_stopped`` + ``committed``;
  partial -> ``conversation.item.input_audio_transcription.delta``; final ->
  the last ``delta`` and ``…completed`` (the final's text, as ``/v1/audio/transcriptions`` gives it
  for the segment's samples). A segment whose final decode has no words completes with ``""``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
)
from openai.types.realtime.conversation_item_input_audio_transcription_completed_event import (
    UsageTranscriptTextUsageDuration,
)
from openai.types.realtime.conversation_item_input_audio_transcription_failed_event import (
    Error as FailedError,
)
from openai.types.realtime.realtime_translation_input_transcript_delta_event import (
    RealtimeTranslationInputTranscriptDeltaEvent,
)
from openai.types.realtime.realtime_translation_output_transcript_delta_event import (
    RealtimeTranslationOutputTranscriptDeltaEvent,
)

from gemma_mesh.gateway.realtime.protocol import dump, new_id


@dataclass
class AppendOnlyText:
    """The text sent so far for one stream of deltas; segments are joined by one space."""

    sent: str = ""
    _segment: int | None = None
    _segment_sent: str = ""  # of the current segment

    def advance(self, segment_id: int, text: str) -> str:
        """The delta that extends the sent text to segment ``segment_id``'s ``text`` ("" when
        ``text`` does not extend what was sent for the segment, or adds nothing)."""
        if segment_id != self._segment:
            self._segment, self._segment_sent = segment_id, ""
        if not text.startswith(self._segment_sent) or len(text) == len(self._segment_sent):
            return ""
        delta = text[len(self._segment_sent) :]
        if not self._segment_sent and self.sent:
            delta = " " + delta  # the segment's first words follow the previous segment's
        self._segment_sent = text
        self.sent += delta
        return delta


@dataclass
class _Item:
    item_id: str
    start_ms: int
    end_ms: int | None = None
    text: AppendOnlyText = field(default_factory=AppendOnlyText)
    completed: bool = False


class TranscriptionTurns:
    """One transcription session's items, fed the pipeline's events in order; each method returns
    the server events (JSON objects) to send."""

    def __init__(self) -> None:
        self._items: dict[int, _Item] = {}
        self._closed: deque[int] = deque()  # segments stopped, not yet completed, in order
        self._last_item: str | None = None

    def item_id(self, segment_id: int) -> str | None:
        item = self._items.get(segment_id)
        return item.item_id if item else None

    def started(self, segment_id: int, ms: int) -> list[dict]:
        item = self._items[segment_id] = _Item(new_id("item"), ms)
        return [
            dump(
                InputAudioBufferSpeechStartedEvent(
                    type="input_audio_buffer.speech_started",
                    event_id=new_id("event"),
                    item_id=item.item_id,
                    audio_start_ms=ms,
                )
            )
        ]

    def stopped(self, segment_id: int, ms: int) -> list[dict]:
        item = self._items[segment_id]
        item.end_ms = ms
        self._closed.append(segment_id)
        events = [
            InputAudioBufferSpeechStoppedEvent(
                type="input_audio_buffer.speech_stopped",
                event_id=new_id("event"),
                item_id=item.item_id,
                audio_end_ms=ms,
            ),
            committed(item.item_id, self._last_item),
        ]
        self._last_item = item.item_id
        return [dump(e) for e in events]

    def partial(self, segment_id: int, committed_text: str) -> list[dict]:
        item = self._items.get(segment_id)
        if item is None or item.completed:
            return []
        return _delta(item, committed_text)

    def final(self, segment_id: int, text: str) -> list[dict]:
        item = self._items.get(segment_id)
        if item is None or item.completed:
            return []
        return _delta(item, text) + _complete(item, text)

    def final_done(self) -> list[dict]:
        """After each final (``CaptionPipeline.on_final``, in segment order): the oldest stopped
        segment completes with ``""`` if its decode gave no text (no final event came)."""
        if not self._closed:
            return []
        segment_id = self._closed.popleft()
        item = self._items.pop(segment_id)
        return [] if item.completed else _complete(item, "")

    def drop_pending(self) -> list[dict]:
        """The buffer was cleared and its pipeline stopped: items not yet stopped are forgotten;
        items stopped but not completed get ``…input_audio_transcription.failed`` (their decode
        was dropped with the buffer)."""
        events = [
            dump(
                ConversationItemInputAudioTranscriptionFailedEvent(
                    type="conversation.item.input_audio_transcription.failed",
                    event_id=new_id("event"),
                    item_id=self._items[segment_id].item_id,
                    content_index=0,
                    error=FailedError(
                        type="invalid_request_error",
                        code="input_audio_buffer_cleared",
                        message="the input audio buffer was cleared before this turn's transcription completed",
                    ),
                )
            )
            for segment_id in self._closed
            if not self._items[segment_id].completed
        ]
        self._items.clear()
        self._closed.clear()
        return events


def _complete(item: _Item, text: str) -> list[dict]:
    item.completed = True
    return [completed(item.item_id, text, ((item.end_ms or item.start_ms) - item.start_ms) / 1000)]


def _delta(item: _Item, text: str) -> list[dict]:
    delta = item.text.advance(0, text)
    return [delta_event(item.item_id, delta)] if delta else []


def committed(item_id: str, previous_item_id: str | None) -> InputAudioBufferCommittedEvent:
    return InputAudioBufferCommittedEvent(
        type="input_audio_buffer.committed",
        event_id=new_id("event"),
        item_id=item_id,
        previous_item_id=previous_item_id,
    )


def completed(item_id: str, text: str, seconds: float) -> dict:
    """``…input_audio_transcription.completed``; usage is the item's audio duration (OpenAI's
    ``duration`` usage, as for whisper-1)."""
    return dump(
        ConversationItemInputAudioTranscriptionCompletedEvent(
            type="conversation.item.input_audio_transcription.completed",
            event_id=new_id("event"),
            item_id=item_id,
            content_index=0,
            transcript=text,
            usage=UsageTranscriptTextUsageDuration(type="duration", seconds=round(max(seconds, 0.0), 3)),
        )
    )


def delta_event(item_id: str, delta: str) -> dict:
    return dump(
        ConversationItemInputAudioTranscriptionDeltaEvent(
            type="conversation.item.input_audio_transcription.delta",
            event_id=new_id("event"),
            item_id=item_id,
            content_index=0,
            delta=delta,
        )
    )


def cleared() -> dict:
    return dump(InputAudioBufferClearedEvent(type="input_audio_buffer.cleared", event_id=new_id("event")))


def translation_delta(kind: str, delta: str, elapsed_ms: int) -> dict:
    """``session.output_transcript.delta`` (``kind`` ``output``: translated text) or
    ``session.input_transcript.delta`` (``input``: the source transcript), ``elapsed_ms`` on the
    session's audio clock (the end of the audio the text covers)."""
    model = (
        RealtimeTranslationOutputTranscriptDeltaEvent
        if kind == "output"
        else RealtimeTranslationInputTranscriptDeltaEvent
    )
    return dump(
        model(
            type=f"session.{kind}_transcript.delta",
            event_id=new_id("event"),
            delta=delta,
            elapsed_ms=elapsed_ms,
        )
    )
