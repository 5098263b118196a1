"""The OpenAI Realtime API (``/v1/realtime``, ``/v1/realtime/translations``) through the official
``openai`` SDK's realtime clients against the real mesh, on LibriVox speech sent as 24 kHz PCM16."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import soxr
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from gemma_mesh.model.audio_io import decode_audio

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "gemma-4-e4b-it"
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
RATE = 24000
CHUNK_MS = 100
CLIP = "sense_and_sensibility_01_austen_64kb-0870.wav"


@pytest.fixture(scope="module")
def pcm24(librivox_clips) -> np.ndarray:
    """The clip at 24 kHz, then 1.5 s of silence (so the VAD ends the turn), as int16."""
    clip = next(p for p in librivox_clips if p.name == CLIP)
    audio = soxr.resample(decode_audio(clip, 16000), 16000, RATE, quality="HQ")
    audio = np.concatenate([audio, np.zeros(int(1.5 * RATE), np.float32)])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2")


def chunks(pcm: np.ndarray) -> list[np.ndarray]:
    step = RATE * CHUNK_MS // 1000
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.tobytes()).decode()


def client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def recv(connection, timeout_s: float = 60.0) -> dict:
    """The next server event as sent (the SDK's ``recv`` parses without validating: its JSON is
    what the assertions below read)."""
    return json.loads(await asyncio.wait_for(connection.recv_bytes(), timeout_s))


async def recv_until(connection, predicate, timeout_s: float = 120.0) -> list[dict]:
    events: list[dict] = []
    async with asyncio.timeout(timeout_s):
        while True:
            events.append(await recv(connection, timeout_s))
            if predicate(events):
                return events


def model_rate_samples(pcm: np.ndarray) -> np.ndarray:
    """What the gateway makes of ``pcm`` sent in CHUNK_MS appends: soxr's streaming HQ resampler to 16 kHz."""
    stream = soxr.ResampleStream(RATE, 16000, 1, dtype="float32", quality="HQ")
    return np.concatenate([stream.resample_chunk(c.astype(np.float32) / 32768.0) for c in chunks(pcm)])


def transcription_of(url: str, audio16: np.ndarray, tmp_path, name: str, language: str | None = None) -> str:
    """``/v1/audio/transcriptions`` of ``audio16`` (16 kHz float32) with the session's ``language``
    (it is part of the instruction, so the same request needs the same language)."""
    path = tmp_path / f"{name}.wav"
    sf.write(path, audio16, 16000, subtype="FLOAT")
    with path.open("rb") as f:
        reply = httpx.post(
            f"{url}/v1/audio/transcriptions",
            files={"file": (path.name, f, "audio/wav")},
            data={"model": MODEL, **({"language": language} if language else {})},
            timeout=120,
        )
    assert reply.status_code == 200, reply.text
    return reply.json()["text"]


def turns_done(events: list[dict]) -> bool:
    started = sum(e["type"] == "input_audio_buffer.speech_started" for e in events)
    done = sum(e["type"] == "conversation.item.input_audio_transcription.completed" for e in events)
    return started > 0 and done == started


async def test_server_vad_turns_at_24_khz(gateway_url, pcm24, tmp_path):
    """Per VAD turn: speech_started, speech_stopped, committed, deltas, completed, in that order;
    deltas concatenate to text the final extends (or stop where it disagrees); completed equals
    /v1/audio/transcriptions of the turn's samples."""
    async with client(gateway_url).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = await recv(connection)
        assert created["type"] == "session.created"
        assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                        # OpenAI's default padding (the gateway's is 200 ms)
                        "turn_detection": {"type": "server_vad", "prefix_padding_ms": 300},
                        "noise_reduction": {"type": "near_field"},
                    }
                },
            }
        )
        updated = await recv(connection)
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
        assert updated["session"]["audio"]["input"]["noise_reduction"] == {"type": "near_field"}
        assert updated["session"]["audio"]["input"]["turn_detection"]["prefix_padding_ms"] == 300
        assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
        for chunk in chunks(pcm24):  # 4x real time
            await connection.input_audio_buffer.append(audio=b64(chunk))
            await asyncio.sleep(CHUNK_MS / 4000)
        events = await recv_until(connection, turns_done)

    types = [e["type"] for e in events]
    assert "error" not in types, [e for e in events if e["type"] == "error"]
    for event in events:
        SERVER_EVENT.validate_python(event)  # each is a valid event of the SDK's own types
    items = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    assert items and len(set(items)) == len(items)
    audio16 = model_rate_samples(pcm24)
    previous = None
    for item in items:
        mine = [e for e in events if e.get("item_id") == item]
        kinds = [e["type"] for e in mine]
        order = [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
        ]
        assert [k for k in kinds if k in order] == order, kinds
        assert kinds.index("conversation.item.input_audio_transcription.completed") == len(kinds) - 1
        start = mine[0]["audio_start_ms"]
        end = next(e for e in mine if e["type"] == "input_audio_buffer.speech_stopped")["audio_end_ms"]
        assert 0 <= start < end <= len(pcm24) * 1000 // RATE
        committed = next(e for e in mine if e["type"] == "input_audio_buffer.committed")
        assert committed.get("previous_item_id") == previous
        previous = item
        transcript = mine[-1]["transcript"]
        deltas = [e["delta"] for e in mine if e["type"].endswith(".delta")]
        assert all(deltas)
        joined = "".join(deltas)
        # Append-only: either the final extends the committed text (the deltas spell the transcript)
        # or it disagrees with it, and then no delta came after the committed text's last.
        if joined and transcript.startswith(joined.rstrip()):
            assert joined == transcript, (joined, transcript)
        assert mine[-1]["usage"] == {
            "type": "duration",
            "seconds": pytest.approx((end - start) / 1000, abs=1e-3),
        }
        # VAD bounds are whole ms (multiples of 16 samples at 16 kHz)
        assert transcript == transcription_of(
            gateway_url, audio16[start * 16 : end * 16], tmp_path, item, language="en"
        )
    assert any(e["type"].endswith(".delta") for e in events), "no deltas at all"


async def test_manual_commit_and_clear(gateway_url, pcm24, tmp_path):
    """turn_detection null: commit makes one item of the buffer (its completed = the transcription
    endpoint on the same samples); clear drops the buffer (a commit after it has nothing)."""
    speech = pcm24[: -int(1.5 * RATE)]
    async with client(gateway_url).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert (await recv(connection))["type"] == "session.created"
        await connection.session.update(
            session={"type": "transcription", "audio": {"input": {"turn_detection": None}}}
        )
        updated = await recv(connection)
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        for chunk in chunks(speech[: RATE // 2]):
            await connection.input_audio_buffer.append(audio=b64(chunk))
        await connection.input_audio_buffer.clear()
        assert (await recv(connection))["type"] == "input_audio_buffer.cleared"
        await connection.input_audio_buffer.commit(event_id="evt_empty")
        refused = await recv(connection)
        assert refused["type"] == "error" and "buffer too small" in refused["error"]["message"]
        assert refused["error"]["event_id"] == "evt_empty"
        for chunk in chunks(speech):
            await connection.input_audio_buffer.append(audio=b64(chunk))
        await connection.input_audio_buffer.commit()
        events = await recv_until(
            connection, lambda es: es[-1]["type"] == "conversation.item.input_audio_transcription.completed"
        )
    assert events[0]["type"] == "input_audio_buffer.committed"
    item = events[0]["item_id"]
    assert {e["item_id"] for e in events} == {item}
    transcript = events[-1]["transcript"]
    assert "".join(e["delta"] for e in events if e["type"].endswith(".delta")) == transcript
    stream = soxr.ResampleStream(RATE, 16000, 1, dtype="float32", quality="HQ")
    parts = [stream.resample_chunk(c.astype(np.float32) / 32768.0) for c in chunks(speech)]
    audio16 = np.concatenate([*parts, stream.resample_chunk(np.zeros(0, np.float32), last=True)])
    assert transcript == transcription_of(gateway_url, audio16, tmp_path, "manual")


async def test_bad_input_gets_openai_error_events_and_the_session_goes_on(gateway_url, pcm24):
    async with client(gateway_url).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert (await recv(connection))["type"] == "session.created"
        cases = [
            (
                {"type": "input_audio_buffer.append", "audio": "not base64!!", "event_id": "e1"},
                "audio",
                "base64",
            ),
            (
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(pcm24[:10].tobytes() + b"\x00").decode(),
                    "event_id": "e2",
                },
                "audio",
                "frames",
            ),
            (
                {"type": "input_audio_buffer.append", "audio": b64(pcm24[: 3 * RATE]), "event_id": "e3"},
                "audio",
                "max_audio_chunk_ms",
            ),
            ({"type": "conversation.item.create", "item": {}, "event_id": "e4"}, "type", "Supported values"),
            ({"type": "no.such.event", "event_id": "e5"}, "type", "Supported values"),
            (
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}},
                    },
                    "event_id": "e6",
                },
                "session.audio.input.format.rate",
                "24000",
            ),
            (
                {"type": "session.update", "session": {"type": "realtime"}, "event_id": "e7"},
                "session.type",
                "transcription",
            ),
        ]
        for event, param, needle in cases:
            await connection.send(event)
            error = await recv(connection)
            assert error["type"] == "error", error
            body = error["error"]
            assert body["type"] == "invalid_request_error" and body["event_id"] == event["event_id"]
            assert body["param"] == param and needle in body["message"], body
            assert error["event_id"].startswith("event_")
        # still serving: a valid update is applied
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            }
        )
        updated = await recv(connection)
        assert updated["type"] == "session.updated"
        assert updated["session"]["audio"]["input"]["format"]["rate"] == 16000


async def test_keys_and_client_secrets(secured_gateway_url, pcm24):
    """A wrong key is refused at the upgrade (HTTP 403); a client secret works in place of the key
    until it expires."""
    import websockets

    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with client(secured_gateway_url, "wrong-key").realtime.connect(
            extra_query={"intent": "transcription"}
        ):
            pass
    assert refused.value.response.status_code == 403
    reply = httpx.post(
        f"{secured_gateway_url}/v1/realtime/client_secrets",
        headers={"Authorization": "Bearer test-key-1"},
        json={"expires_after": {"anchor": "created_at", "seconds": 60}, "session": {"type": "transcription"}},
    )
    assert reply.status_code == 200, reply.text
    secret = reply.json()
    assert secret["value"].startswith("v1.") and 55 <= secret["expires_at"] - time.time() <= 61
    assert secret["session"]["type"] == "transcription"
    async with client(secured_gateway_url, secret["value"]).realtime.connect(
        extra_query={"intent": "transcription"}
    ) as connection:
        assert (await recv(connection))["type"] == "session.created"
    # a browser's way: the secret as a subprotocol (it cannot set headers on a WebSocket)
    url = secured_gateway_url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription"
    async with websockets.connect(
        url, subprotocols=["realtime", f"openai-insecure-api-key.{secret['value']}"]
    ) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
    too_long = httpx.post(
        f"{secured_gateway_url}/v1/realtime/client_secrets",
        headers={"Authorization": "Bearer test-key-1"},
        json={"expires_after": {"seconds": 7200}},
    )
    assert too_long.status_code == 400 and "token_ttl_s" in too_long.json()["error"]["message"]
    assert httpx.post(f"{secured_gateway_url}/v1/realtime/client_secrets").status_code == 401


async def test_translation_session(gateway_url, pcm24):
    """Output and input transcript deltas arrive, each stream in order on the audio clock; no audio
    deltas; session.close flushes and answers session.closed."""
    async with client(gateway_url).realtime.translations.connect(
        model="gpt-realtime-translate"
    ) as connection:
        created = await recv(connection)
        assert created["type"] == "session.created" and created["session"]["type"] == "translation"
        assert created["session"]["model"] == "gpt-realtime-translate"
        await connection.session.update(
            session={
                "audio": {
                    "output": {"language": "fr"},
                    "input": {"transcription": {"model": "gpt-4o-transcribe"}},
                }
            }
        )
        updated = await recv(connection)
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["audio"]["output"]["language"] == "fr"
        for chunk in chunks(pcm24):
            await connection.send({"type": "session.input_audio_buffer.append", "audio": b64(chunk)})
            await asyncio.sleep(CHUNK_MS / 4000)
        await connection.session.close()
        events = await recv_until(connection, lambda es: es[-1]["type"] == "session.closed")
    types = {e["type"] for e in events}
    assert "error" not in types and "session.output_audio.delta" not in types, events
    for kind in ("output", "input"):
        deltas = [e for e in events if e["type"] == f"session.{kind}_transcript.delta"]
        assert deltas, f"no {kind} transcript deltas: {events}"
        clock = [e["elapsed_ms"] for e in deltas]
        assert clock == sorted(clock) and 0 < clock[-1] <= len(pcm24) * 1000 // RATE
        assert all(e["delta"] for e in deltas)


async def test_clear_under_server_vad_restarts_the_turns(gateway_url, pcm24):
    """clear mid-speech under server_vad: cleared, and turns after it get new items that complete."""
    async with client(gateway_url).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert (await recv(connection))["type"] == "session.created"
        for chunk in chunks(pcm24[: 2 * RATE]):
            await connection.input_audio_buffer.append(audio=b64(chunk))
            await asyncio.sleep(CHUNK_MS / 4000)
        await connection.input_audio_buffer.clear()
        before = await recv_until(connection, lambda es: es[-1]["type"] == "input_audio_buffer.cleared")
        for chunk in chunks(pcm24):
            await connection.input_audio_buffer.append(audio=b64(chunk))
            await asyncio.sleep(CHUNK_MS / 4000)
        after = await recv_until(connection, turns_done)
    assert not [e for e in before + after if e["type"] == "error"]
    old = {e["item_id"] for e in before if "item_id" in e}
    started = [e["item_id"] for e in after if e["type"] == "input_audio_buffer.speech_started"]
    assert started and not old & set(started)
    completed = [e for e in after if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert {e["item_id"] for e in completed} == set(started)
