"""Resume: a client that reconnects (to any replica) with its session id and last event id gets
exactly what it missed; a gateway killed mid-session and a Redis restart lose no committed caption."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from gemma_mesh.gateway.protocol import MediaKind, pack_media
from gemma_mesh.model.audio_io import decode_audio
from tests.gateway.mesh import GatewayProcess, GatewayThread
from tests.gateway.redis_server import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")
RATE = 16000
CHUNK = 1600  # 100 ms


def ws_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/v1/stream"


@pytest.fixture(scope="module")
def speech(librivox_clips) -> np.ndarray:
    """Three LibriVox clips with 1.5 s of silence after each: three segments, finals between them."""
    gap = np.zeros(int(1.5 * RATE), np.float32)
    parts = []
    for clip in librivox_clips[:3]:
        parts += [decode_audio(clip, RATE), gap]
    return np.concatenate(parts)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


class Client:
    """A raw /v1/stream client that records every event and can send audio from any position."""

    def __init__(self, url: str) -> None:
        self.url = ws_url(url)
        self.events: list[dict] = []
        self.ws = None

    async def connect(self, **start) -> dict:
        self.ws = await websockets.connect(self.url, max_size=None)
        await self.ws.send(json.dumps({"type": "session.start", **start}))
        return await self.next_event()

    async def next_event(self, timeout_s: float = 60.0) -> dict:
        event = json.loads(await asyncio.wait_for(self.ws.recv(), timeout_s))
        self.events.append(event)
        return event

    async def until(self, predicate, timeout_s: float = 90.0) -> list[dict]:
        got = []
        async with asyncio.timeout(timeout_s):
            while True:
                got.append(await self.next_event())
                if predicate(got[-1]):
                    return got

    async def send_audio(self, audio: np.ndarray, from_ms: int, to_ms: int, speed: float = 4.0) -> None:
        data = pcm16(audio)
        for start in range(from_ms * RATE // 1000, min(to_ms * RATE // 1000, len(audio)), CHUNK):
            await self.ws.send(
                pack_media(MediaKind.AUDIO, start * 1000 // RATE, data[2 * start : 2 * (start + CHUNK)])
            )
            await asyncio.sleep(0.1 / speed)


def finals(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "caption.final"]


async def test_gateway_killed_mid_session_resumes_on_another_replica(backends, speech):
    redis_url = "redis://127.0.0.1:6379/0"
    first = GatewayProcess(backends, GEMMA_MESH_GATEWAY_REDIS_URL=redis_url)
    second = GatewayProcess(backends, GEMMA_MESH_GATEWAY_REDIS_URL=redis_url)
    first.start()
    second.start()
    try:
        client = Client(first.url)
        started = await client.connect()
        session_id = started["session_id"]
        # Stream until the first segment's final arrives, then a little more, then kill the replica.
        sender = asyncio.create_task(client.send_audio(speech, 0, len(speech) * 1000 // RATE, speed=2.0))
        await client.until(lambda e: e["type"] == "caption.final")
        await asyncio.sleep(0.5)
        first.kill()
        sender.cancel()
        seen = [e for e in client.events]
        committed = finals(seen)
        assert committed

        # Reconnect to the other replica, claiming to have only event 1: everything after it is replayed.
        resumed = Client(second.url)
        first_replayed = await resumed.connect(session_id=session_id, last_event_id=1)
        replay = [first_replayed, *await resumed.until(lambda e: e["type"] == "session.started")]
        replayed, restarted = replay[:-1], replay[-1]
        assert [e["event_id"] for e in replayed] == list(range(2, replayed[-1]["event_id"] + 1))
        by_id = {e["event_id"]: e for e in replayed}
        for event in seen[1:]:
            assert by_id[event["event_id"]] == event  # identical content, nothing committed lost
        assert restarted["resumed"] and restarted["session_id"] == session_id
        assert restarted["event_id"] > max(e["event_id"] for e in seen)

        # Continue from the gateway's durable audio clock: the rest of the speech is captioned.
        clock = restarted["audio_clock_ms"]
        assert clock >= committed[-1]["end_ms"]
        await resumed.send_audio(speech, clock, len(speech) * 1000 // RATE, speed=8.0)
        await resumed.ws.send(json.dumps({"type": "session.end"}))
        tail = await resumed.until(lambda e: e["type"] == "session.ended")
        all_finals = finals(replayed) + finals(tail)
        segment_ids = [f["segment_id"] for f in all_finals]
        assert segment_ids == sorted(set(segment_ids))
        assert len(all_finals) >= 3
        ids = [e["event_id"] for e in replay + tail]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        await resumed.ws.close()
    finally:
        first.stop()
        second.stop()


async def test_redis_restart_mid_session_loses_no_caption(backends, speech, tmp_path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        with GatewayThread(backends.gateway_settings(redis_url=server.url)) as url:
            client = Client(url)
            started = await client.connect()
            total_ms = len(speech) * 1000 // RATE
            await client.send_audio(speech, 0, total_ms // 3)
            server.kill()  # Redis down while captions keep coming
            await client.send_audio(speech, total_ms // 3, 2 * total_ms // 3)
            server.start()
            await client.send_audio(speech, 2 * total_ms // 3, total_ms)
            await client.ws.send(json.dumps({"type": "session.end"}))
            await client.until(lambda e: e["type"] == "session.ended")
            await client.ws.close()
            live_finals = finals(client.events)
            assert len(live_finals) >= 3
        # A fresh replica on the restarted Redis replays every event, finals included.
        with GatewayThread(backends.gateway_settings(redis_url=server.url)) as url:
            replay_client = Client(url)
            first = await replay_client.connect(session_id=started["session_id"], last_event_id=0)
            # The session ended: the resume replays the whole log (ending in session.ended) and closes.
            stored = [first, *await replay_client.until(lambda e: e["type"] == "session.ended")]
            with pytest.raises(websockets.ConnectionClosedOK):
                await replay_client.next_event(timeout_s=10)
        assert [e["event_id"] for e in stored] == [e["event_id"] for e in client.events]
        assert finals(stored) == live_finals
    finally:
        server.kill()


async def test_resume_takes_over_a_live_connection_after_it_flushes(gateway_url, speech):
    """A second connection resuming a session still attached elsewhere waits until the first has
    finished decoding what it received (its final is in the replay), then the first is closed."""
    first = Client(gateway_url)
    started = await first.connect()
    await first.send_audio(speech, 0, 4000, speed=8.0)  # inside the first clip: a segment is open
    await first.until(lambda e: e["type"] == "caption.partial")
    second = Client(gateway_url)
    replayed = [await second.connect(session_id=started["session_id"], last_event_id=0)]
    replayed += await second.until(lambda e: e["type"] == "session.started" and e["resumed"])
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await first.next_event(timeout_s=30)
    assert closed.value.rcvd.code == 4001
    flushed = [e for e in replayed if e["type"] == "caption.final"]
    assert flushed and flushed[-1]["reason"] == "end"  # the first connection's open segment
    ids = [e["event_id"] for e in replayed]
    assert ids == list(range(1, len(ids) + 1))  # complete, in order
    assert replayed[-1]["audio_clock_ms"] >= flushed[-1]["end_ms"]
    await second.ws.close()


@pytest.mark.parametrize("redis_url", [None, "redis://127.0.0.1:6379/0"], ids=["memory", "redis"])
async def test_session_leases(redis_url):
    import uuid

    from gemma_mesh.gateway.sessions.lease import open_leases

    leases = open_leases(redis_url, ttl_s=0.5)
    sid = uuid.uuid4().hex
    try:
        assert await leases.claim(sid, "a") is None
        assert await leases.claim(sid, "a") is None  # re-entrant
        assert await leases.claim(sid, "b") == "a"  # busy: a takeover is requested
        assert not await leases.keep(sid, "a")  # a is told to let go
        await leases.release(sid, "a")
        assert await leases.claim(sid, "b") is None
        assert await leases.keep(sid, "b")
        await asyncio.sleep(0.7)  # b stops refreshing (a dead replica): the lease expires
        assert await leases.claim(sid, "c") is None
        await leases.release(sid, "b")  # not b's any more: no effect
        assert await leases.claim(sid, "d") == "c"
        await asyncio.sleep(0.7)  # c's lease and d's request both lapse (a Redis outage past the lease)
        assert await leases.keep(sid, "c")  # nobody else claims it: c re-takes it, no takeover
        assert await leases.claim(sid, "e") == "c"  # and holds it again
        assert not await leases.keep(sid, "c")  # a real takeover still wins
    finally:
        await leases.close()


async def test_redis_outage_longer_than_the_lease_keeps_the_connection(backends, speech, tmp_path):
    """Redis killed (no persistence: it comes back empty) for longer than the session lease while
    audio streams: the connection stays attached (no 4001, no split utterance), captions go on, and
    the session ends normally; its events are all in the re-written log."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    lease_s = 1.0
    try:
        settings = backends.gateway_settings(redis_url=server.url, session_lease_s=lease_s)
        with GatewayThread(settings) as url:
            client = Client(url)
            started = await client.connect()
            total_ms = len(speech) * 1000 // RATE
            await client.send_audio(speech, 0, 2000)  # inside the first clip: a segment is open
            server.kill()
            await asyncio.sleep(3 * lease_s)  # past the lease: it lapses in no Redis at all
            await client.send_audio(speech, 2000, total_ms // 2)
            server.start()
            await asyncio.sleep(3 * lease_s)  # several refreshes against the restarted Redis
            await client.send_audio(speech, total_ms // 2, total_ms)
            await client.ws.send(json.dumps({"type": "session.end"}))
            await client.until(lambda e: e["type"] == "session.ended")
            with pytest.raises(websockets.ConnectionClosedOK):
                await client.next_event(timeout_s=10)
            assert client.ws.close_code == 1000
            live = finals(client.events)
            # One final per segment, none cut short by a detach ("end" only closes the last).
            assert len(live) >= 3 and all(f["reason"] != "end" for f in live[:-1]), live
            assert [f["segment_id"] for f in live] == list(range(len(live)))
            # A replay from the restarted Redis returns every event the client saw.
            replay_client = Client(url)
            first = await replay_client.connect(session_id=started["session_id"], last_event_id=0)
            stored = [first, *await replay_client.until(lambda e: e["type"] == "session.ended")]
            assert [e["event_id"] for e in stored] == [e["event_id"] for e in client.events]
            await replay_client.ws.close()
    finally:
        server.kill()
