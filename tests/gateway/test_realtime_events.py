"""``realtime.events``: pipeline events -> Realtime server events (pure logic, no sockets)."""

from __future__ import annotations

from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from gemma_mesh.gateway.realtime.events import AppendOnlyText, TranscriptionTurns, translation_delta
from gemma_mesh.gateway.realtime.protocol import merge

SERVER_EVENT = TypeAdapter(RealtimeServerEvent)


def test_append_only_text_extends_and_never_takes_back() -> None:
    text = AppendOnlyText()
    assert text.advance(0, "the quick") == "the quick"
    assert text.advance(0, "the quick brown") == " brown"
    assert text.advance(0, "the quick brown") == ""  # nothing new
    assert text.advance(0, "a slow brown fox") == ""  # disagrees with what was sent: nothing
    assert text.advance(1, "jumps") == " jumps"  # a new segment follows with one space
    assert text.sent == "the quick brown jumps"


def test_a_turn_in_order_and_validating_as_the_sdk_types() -> None:
    turns = TranscriptionTurns()
    events = turns.started(0, 120)
    events += turns.partial(0, "hello")
    events += turns.stopped(0, 1840)
    events += turns.partial(0, "hello world")
    events += turns.final(0, "hello world again")
    events += turns.final_done()  # the final came: nothing more
    for event in events:
        SERVER_EVENT.validate_python(event)  # each is a valid SDK server event
    assert [e["type"] for e in events] == [
        "input_audio_buffer.speech_started",
        "conversation.item.input_audio_transcription.delta",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert len({e["item_id"] for e in events}) == 1
    deltas = [e["delta"] for e in events if e["type"].endswith(".delta")]
    assert "".join(deltas) == "hello world again" == events[-1]["transcript"]
    assert events[-1]["usage"] == {"type": "duration", "seconds": 1.72}
    assert events[0]["audio_start_ms"] == 120 and events[2]["audio_end_ms"] == 1840


def test_a_turn_without_words_completes_empty_and_items_chain() -> None:
    turns = TranscriptionTurns()
    first = turns.started(0, 0) + turns.stopped(0, 900)
    second = turns.started(1, 1000) + turns.stopped(1, 2000)
    done = turns.final_done()  # segment 0's decode had no words: no final event came
    assert [e["type"] for e in done] == ["conversation.item.input_audio_transcription.completed"]
    assert done[0]["transcript"] == "" and done[0]["item_id"] == first[0]["item_id"]
    assert second[2]["previous_item_id"] == first[0]["item_id"]
    assert turns.final(1, "later words")[-1]["transcript"] == "later words"


def test_translation_deltas_and_session_update_merge() -> None:
    event = translation_delta("output", " bonjour", 2400)
    assert event["type"] == "session.output_transcript.delta" and event["elapsed_ms"] == 2400
    assert translation_delta("input", "hello", 2400)["type"] == "session.input_transcript.delta"
    current = {"audio": {"input": {"turn_detection": {"type": "server_vad"}, "format": {"rate": 24000}}}}
    merged = merge(current, {"audio": {"input": {"turn_detection": None}}})
    assert merged["audio"]["input"] == {"turn_detection": None, "format": {"rate": 24000}}


def test_clearing_fails_the_turns_stopped_but_not_completed() -> None:
    turns = TranscriptionTurns()
    done = turns.started(0, 0) + turns.stopped(0, 900) + turns.final(0, "finished turn")
    pending = turns.started(1, 1000) + turns.stopped(1, 2000)
    turns.started(2, 2100)  # still open: forgotten without an event
    failed = turns.drop_pending()
    for event in failed:
        SERVER_EVENT.validate_python(event)
    assert [(e["type"], e["item_id"]) for e in failed] == [
        ("conversation.item.input_audio_transcription.failed", pending[0]["item_id"])
    ]
    assert failed[0]["error"]["code"] == "input_audio_buffer_cleared"
    assert done[-1]["transcript"] == "finished turn"
    assert turns.final_done() == [] and turns.partial(2, "late") == []
