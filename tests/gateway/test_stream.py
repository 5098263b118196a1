"""``WS /v1/stream`` against the real mesh: captions, translation, frames, bad input, limits.

The tiny bundle has random weights, so texts are noise: tests assert structure, ordering, timing,
determinism and equality between paths, never words.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import websockets
from PIL import Image

from gemma_mesh.gateway.protocol import SERVER_EVENT, MediaKind, pack_media
from gemma_mesh.model.audio_io import decode_audio
from gemma_mesh.stream_client import StreamOptions, stream

pytestmark = pytest.mark.asyncio(loop_scope="module")
RATE = 16000
CLIP = "sense_and_sensibility_01_austen_64kb-0870.wav"


def speech_bounds_ms(audio: np.ndarray, window_ms: int = 30) -> tuple[int, int]:
    """First and last window whose RMS is within 30 dB of the loudest: where the speech is."""
    hop = RATE * window_ms // 1000
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    db = 10 * np.log10((frames**2).mean(axis=1) + 1e-12)
    loud = np.flatnonzero(db > db.max() - 30)
    return int(loud[0] * window_ms), int((loud[-1] + 1) * window_ms)


SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def check_schema(event: dict) -> None:
    """``event`` validates against its committed JSON Schema (docs/schemas/<type>.json)."""
    schema = json.loads((SCHEMAS / f"{event['type']}.json").read_text())
    jsonschema.validate(event, schema)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (valid CRC): a decompression bomb."""
    import struct
    import zlib

    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def ws_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/v1/stream"


def jpeg(array: np.ndarray, size: int = 256) -> bytes:
    image = Image.fromarray(array)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG")
    return out.getvalue()


async def recv_until(ws, predicate, timeout_s: float = 60.0) -> list[dict]:
    """Events until one satisfies ``predicate`` (included)."""
    events: list[dict] = []
    async with asyncio.timeout(timeout_s):
        while True:
            event = json.loads(await ws.recv())
            SERVER_EVENT.validate_python(event)  # every event matches its model and its schema
            check_schema(event)
            events.append(event)
            if predicate(event):
                return events


async def start_session(ws, **config) -> dict:
    await ws.send(json.dumps({"type": "session.start", "config": config}))
    started = json.loads(await ws.recv())
    assert started["type"] == "session.started", started
    return started


@pytest.fixture(scope="module")
def clip(librivox_clips):
    return next(p for p in librivox_clips if p.name == CLIP)


@pytest.mark.parametrize("realtime", [True, False], ids=["realtime", "4x"])
async def test_librivox_captions_are_ordered_and_cover_the_speech(gateway_url, clip, realtime):
    result = await stream(StreamOptions(audio=clip, url=gateway_url, realtime=realtime, speed=4.0))
    for event in result.events:
        check_schema(event)
    ids = [e["event_id"] for e in result.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] == 1
    kinds = [e["type"] for e in result.events]
    assert kinds[0] == "session.started" and kinds[-1] == "session.ended"
    assert "error" not in kinds, [e for e in result.events if e["type"] == "error"]
    partials = result.of_type("caption.partial")
    finals = result.of_type("caption.final")
    assert finals, kinds
    assert partials, "a 7 s clip must give partial hypotheses before its final"
    # Partials of a segment come before its final, grow in time, and never change committed text.
    for final in finals:
        seg = [p for p in partials if p["segment_id"] == final["segment_id"]]
        assert all(p["event_id"] < final["event_id"] for p in seg)
        assert [p["end_ms"] for p in seg] == sorted(p["end_ms"] for p in seg)
        committed = [p["committed"] for p in seg]
        assert all(b.startswith(a) for a, b in itertools.pairwise(committed))
        assert final["start_ms"] < final["end_ms"] and final["text"]
    samples = decode_audio(clip, RATE)
    start_ms, end_ms = speech_bounds_ms(samples)
    assert finals[0]["start_ms"] <= start_ms + 100
    assert finals[-1]["end_ms"] >= end_ms - 100
    ends = [f["end_ms"] for f in finals]
    assert ends == sorted(ends)
    # The audio clock at the end counts every sample sent, trailing silence included.
    sent = (
        samples.shape[0] + RATE * StreamOptions(audio=clip).tail_silence_ms // 1000
    )  # the client adds silence
    assert result.events[-1]["audio_clock_ms"] == sent * 1000 // RATE


async def test_the_audio_clock_at_the_end_counts_every_sample(gateway_url, clip):
    """Ended mid-speech (no trailing silence: the flush closes the open segment), the clock still
    covers all audio received, so a client comparing it with what it sent sees nothing lost."""
    samples = decode_audio(clip, RATE)
    result = await stream(StreamOptions(audio=clip, url=gateway_url, speed=8.0, tail_silence_ms=0))
    ended = result.events[-1]
    assert ended["type"] == "session.ended" and result.of_type("caption.final")
    assert ended["audio_clock_ms"] == samples.shape[0] * 1000 // RATE


async def test_silence_and_noise_give_no_captions(gateway_url, tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(0)
    silence = np.zeros(4 * RATE, np.float32)
    white = (rng.standard_normal(4 * RATE) * 0.05).astype(np.float32)
    brown = np.cumsum(rng.standard_normal(4 * RATE)).astype(np.float32)
    brown = (brown - brown.mean()) / np.abs(brown).max() * 0.3
    for name, audio in {"silence": silence, "white": white, "brown": brown}.items():
        path = tmp_path / f"{name}.wav"
        sf.write(path, audio, RATE)
        result = await stream(StreamOptions(audio=path, url=gateway_url, speed=8.0))
        captions = result.of_type("caption.partial", "caption.final")
        assert captions == [], (name, captions)
        assert result.of_type("session.ended")


async def test_translation_events_carry_the_normalised_language(gateway_url, clip):
    result = await stream(
        StreamOptions(audio=clip, url=gateway_url, task="translate", target_language="DE-de", speed=4.0)
    )
    finals = result.of_type("translation.final")
    assert finals and all(f["language"] == "de-DE" for f in finals)
    assert result.of_type("caption.final") == []
    assert result.events[0]["config"]["target_language"] == "de-DE"


async def test_frames_are_analysed_and_streamed(gateway_url):
    from skimage import data

    async with websockets.connect(ws_url(gateway_url)) as ws:
        await start_session(
            ws, audio=None, video={"max_fps": 5, "analysis_interval_ms": 200, "prompt": "What is it?"}
        )
        frame = jpeg(data.astronaut())
        for i in range(3):
            await ws.send(pack_media(MediaKind.FRAME, i * 250, frame))
            await asyncio.sleep(0.25)
        events = await recv_until(ws, lambda e: e["type"] == "frame.analysis" and e["done"])
        analyses = [e for e in events if e["type"] == "frame.analysis"]
        done = analyses[-1]
        assert done["text"] == "".join(
            a["delta"] for a in analyses if a["analysis_id"] == done["analysis_id"]
        )
        assert done["text"]
        await ws.send(json.dumps({"type": "session.end"}))
        tail = await recv_until(ws, lambda e: e["type"] == "session.ended")
        ids = [e["event_id"] for e in events + tail]
        assert ids == sorted(ids)


async def test_newest_frame_wins_and_drops_are_counted(gateway_url):
    import httpx
    from skimage import data

    frames = [jpeg(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await start_session(ws, audio=None, video={"max_fps": 5, "analysis_interval_ms": 2000})
        before = _metric(httpx.get(f"{gateway_url}/metrics").text, "gemma_mesh_gateway_frames_dropped_total")
        for i, frame in enumerate(frames):  # 4 frames within one analysis interval
            await ws.send(pack_media(MediaKind.FRAME, 1000 + i * 200, frame))
        await ws.send(json.dumps({"type": "session.end"}))
        events = await recv_until(ws, lambda e: e["type"] == "session.ended")
    after = _metric(httpx.get(f"{gateway_url}/metrics").text, "gemma_mesh_gateway_frames_dropped_total")
    done = [e for e in events if e["type"] == "frame.analysis" and e["done"]]
    # The first frame starts an analysis at once; of the other three only the newest is analysed.
    assert [d["frame_ms"] for d in done] == [1000, 1600]
    assert after - before == 2


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_bad_input_gets_error_events_and_the_session_goes_on(gateway_url, clip):
    audio = decode_audio(clip, RATE)
    pcm = (audio * 32767).astype("<i2").tobytes()
    async with websockets.connect(ws_url(gateway_url), max_size=None) as ws:
        await start_session(ws, video={"max_fps": 2})
        bad = [
            pack_media(MediaKind.AUDIO, 0, b"\x01\x02\x03"),  # odd byte count for s16le
            b"\x09\x00\x00\x00\x00abc",  # unknown media kind
            b"\x01",  # shorter than the header
            pack_media(MediaKind.FRAME, 0, b"\xff\xd8\xff\xe0 not really a jpeg"),  # corrupt JPEG
            pack_media(MediaKind.FRAME, 0, bomb_png(20000, 20000)),  # a decompression bomb header
            json.dumps({"type": "session.dance"}),  # unknown message type
            json.dumps({"type": "session.update", "config": {"target_language": "xx-notalang"}}),
            "{not json",
            "x" * (1024 * 1024),  # 1 MB text frame
        ]
        for message in bad:
            await ws.send(message)
        events = await recv_until(ws, lambda e: e["type"] == "error" and "max_control_bytes" in e["message"])
        errors = [e for e in events if e["type"] == "error"]
        assert len(errors) == len(bad), [e["message"] for e in errors]
        assert all(not e["fatal"] and e["code"] == "invalid_request_error" for e in errors)
        assert "whole number" in errors[0]["message"]
        assert "JPEG" in errors[3]["message"] or "image" in errors[3]["message"]
        assert "max_frame_pixels" in errors[4]["message"]
        assert not any("0x" in e["message"] for e in errors)  # no object reprs
        # The same session still captions good audio.
        for offset in range(0, len(pcm), 3200):
            await ws.send(pack_media(MediaKind.AUDIO, offset // 32, pcm[offset : offset + 3200]))
        await ws.send(json.dumps({"type": "session.end"}))
        events = await recv_until(ws, lambda e: e["type"] == "session.ended")
        assert [e for e in events if e["type"] == "caption.final"]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"task": "translate"}, "target_language"),
        ({"task": "translate", "target_language": "zz"}, "not a known"),
        ({"audio": {"encoding": "mp3"}}, "audio.encoding"),
        ({"video": {"max_fps": 500}}, "max_fps"),
        ({"video": {"max_soft_tokens": 2**31}}, "max_soft_tokens"),  # not an int32
        ({"video": {"max_soft_tokens": 71}}, "must be one of [70, 140"),  # not a budget of the encoder
    ],
)
async def test_bad_session_start_is_refused_with_an_error_event(gateway_url, config, needle):
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await ws.send(json.dumps({"type": "session.start", "config": config}))
        event = json.loads(await ws.recv())
        assert event["type"] == "error" and event["fatal"] and needle in event["message"], event
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008
    # The server goes on.
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await start_session(ws)


async def test_session_update_changes_the_camera_and_bad_updates_are_refused(gateway_url):
    """``session.update`` merges ``video`` fields into the running config; ``"video": null`` turns
    the camera off (frames are refused) and a later ``video`` turns it on with analysis ids going on;
    an update that does not validate is an error event and the session keeps its config."""
    from skimage import data

    frame = jpeg(data.chelsea(), size=128)

    async def analyse(ws, at_ms: int) -> list[dict]:
        await ws.send(pack_media(MediaKind.FRAME, at_ms, frame))
        return await recv_until(
            ws, lambda e: (e["type"] == "frame.analysis" and e["done"]) or e["type"] == "error"
        )

    def update(config: dict) -> str:
        return json.dumps({"type": "session.update", "config": config})

    async with websockets.connect(ws_url(gateway_url)) as ws:
        await start_session(ws, audio=None, video={"max_fps": 5, "analysis_interval_ms": 200, "prompt": "A?"})
        first = (await analyse(ws, 0))[-1]
        assert first["type"] == "frame.analysis" and first["analysis_id"] == 0
        await ws.send(update({"video": {"prompt": "What colour is it?"}}))  # merged: max_fps stays 5
        second = (await analyse(ws, 1000))[-1]
        assert second["type"] == "frame.analysis" and second["analysis_id"] == 1
        await ws.send(update({"video": {"max_fps": 500}}))  # over the gateway's limit
        refused = await recv_until(ws, lambda e: e["type"] == "error")
        assert "max_fps" in refused[-1]["message"] and not refused[-1]["fatal"]
        for bad, field in (
            ({"partial_interval_ms": 10**12}, "partial_interval_ms"),  # would turn partials off
            ({"video": {"prompt": ""}}, "video.prompt"),
            ({"video": {"prompt": "   "}}, "video.prompt"),
            ({"partial_interval_ms": "500"}, "partial_interval_ms"),  # a number, not a string
            ({"video": {"max_fps": 1e-300}}, "video.max_fps"),
        ):
            await ws.send(update(bad))
            error = (await recv_until(ws, lambda e: e["type"] == "error"))[-1]
            assert field in error["message"] and not error["fatal"], error
        await ws.send(update({"video": {"max_soft_tokens": 71}}))  # not a budget of the encoder
        wrong = (await recv_until(ws, lambda e: e["type"] == "error"))[-1]
        assert wrong["param"] == "video.max_soft_tokens" and "must be one of" in wrong["message"]
        assert not wrong["fatal"]
        kept = (await analyse(ws, 2000))[-1]  # the session kept its config
        assert kept["type"] == "frame.analysis" and kept["analysis_id"] == 2
        await ws.send(update({"video": None}))  # camera off
        off = (await analyse(ws, 3000))[-1]
        assert off["type"] == "error" and "no video config" in off["message"]
        await ws.send(update({"video": {"max_fps": 5, "analysis_interval_ms": 200, "max_soft_tokens": 140}}))
        again = (await analyse(ws, 4000))[-1]  # on again, the ids go on
        assert again["type"] == "frame.analysis" and again["analysis_id"] == 3
        await ws.send(json.dumps({"type": "session.end"}))
        tail = await recv_until(ws, lambda e: e["type"] == "session.ended")
        assert tail[-1]["reason"] == "client"


async def test_last_event_id_without_a_session_is_refused(gateway_url):
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await ws.send(json.dumps({"type": "session.start", "last_event_id": 7}))
        event = json.loads(await ws.recv())
        assert event["type"] == "error" and "session_id" in event["message"] and event["fatal"]


async def test_first_message_must_be_session_start(gateway_url):
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await ws.send(pack_media(MediaKind.AUDIO, 0, b"\x00\x00"))
        event = json.loads(await ws.recv())
        assert event["type"] == "error" and "session.start" in event["message"]


async def test_live_final_equals_the_offline_transcription_of_the_same_audio(
    gateway_url, backends, clip, tmp_path
):
    """The segment's audio, cut from what was streamed by the final's timestamps, through
    /v1/audio/transcriptions gives the final caption's text exactly (the same decode). The live
    decodes predict each segment's previous hypothesis and the API's do not: the prediction saves
    decode steps (accepted tokens counted) without changing a caption. The live finals take their
    soft tokens from the segment's stream (AudioStreamEnd), the API from Encode: no Encode call
    happens until the API is asked."""
    import httpx
    import soundfile as sf
    from prometheus_client import REGISTRY

    def encoded_s() -> float:
        return REGISTRY.get_sample_value("gemma_mesh_audio_seconds_total", {"rpc": "Encode"}) or 0.0

    registry = backends.decoder_server.engine.metrics.registry

    def accepted() -> float:
        sample = registry.get_sample_value(
            "gemma_mesh_decoder_prediction_tokens_total", {"outcome": "accepted"}
        )
        return sample or 0.0

    before, encoded_before = accepted(), encoded_s()
    result = await stream(StreamOptions(audio=clip, url=gateway_url, speed=4.0))
    assert accepted() > before
    assert encoded_s() == encoded_before
    finals = result.of_type("caption.final")
    assert finals and finals[0]["reason"] == "silence"
    audio = decode_audio(clip, RATE)
    streamed = np.concatenate([audio, np.zeros(RATE, np.float32)])  # the client's 1 s tail of silence
    pcm = (np.clip(streamed, -1, 1) * 32767).astype("<i2")
    for final in finals:
        # VAD boundaries are window (512) +- pad (3200) samples: whole multiples of 16 samples (1 ms).
        segment = pcm[final["start_ms"] * RATE // 1000 : final["end_ms"] * RATE // 1000]
        path = tmp_path / f"segment{final['segment_id']}.wav"
        sf.write(path, segment, RATE, subtype="PCM_16")
        with path.open("rb") as f:
            reply = httpx.post(
                f"{gateway_url}/v1/audio/transcriptions",
                files={"file": (path.name, f, "audio/wav")},
                data={"model": "gemma-4-e4b-it", "response_format": "json"},
                timeout=120,
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"] == final["text"]


async def test_resume_ahead_of_the_log_is_refused(gateway_url):
    async with websockets.connect(ws_url(gateway_url)) as ws:
        started = await start_session(ws)
        await ws.send(json.dumps({"type": "session.end"}))
        await recv_until(ws, lambda e: e["type"] == "session.ended")
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await ws.send(
            json.dumps(
                {"type": "session.start", "session_id": started["session_id"], "last_event_id": 10**12}
            )
        )
        event = json.loads(await ws.recv())
        assert event["type"] == "error" and event["param"] == "last_event_id" and "ahead" in event["message"]


async def test_session_end_closes_normally_and_an_ended_session_only_replays(gateway_url, clip):
    audio = decode_audio(clip, RATE)
    pcm = (audio * 32767).astype("<i2").tobytes()
    async with websockets.connect(ws_url(gateway_url)) as ws:
        started = await start_session(ws)
        for offset in range(0, len(pcm), 6400):
            await ws.send(pack_media(MediaKind.AUDIO, offset // 32, pcm[offset : offset + 6400]))
        await ws.send(json.dumps({"type": "session.end"}))
        events = [started, *await recv_until(ws, lambda e: e["type"] == "session.ended")]
        with pytest.raises(websockets.ConnectionClosedOK) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1000  # a normal close, not a dropped connection
    async with websockets.connect(ws_url(gateway_url)) as ws:
        await ws.send(
            json.dumps({"type": "session.start", "session_id": started["session_id"], "last_event_id": 1})
        )
        replay = await recv_until(ws, lambda e: e["type"] == "session.ended")
        assert replay == events[1:]  # exactly what was missed, and no new session.started
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
