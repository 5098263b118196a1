"""API keys, session tokens, origins, per-key session limits, backpressure and slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import httpx
import numpy as np
import pytest
import websockets

from gemma_mesh.common.errors import Unauthenticated
from gemma_mesh.gateway.auth import Authenticator, key_id
from gemma_mesh.gateway.outbound import Outbound
from gemma_mesh.gateway.protocol import MediaKind, pack_media
from gemma_mesh.gateway.settings import GatewaySettings
from tests.gateway.conftest import SECURED_PREFIX
from tests.gateway.mesh import GatewayProcess, GatewayThread


def ws_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/v1/stream"


def token_for(url: str, key: str) -> str:
    reply = httpx.post(f"{url}/v1/stream/token", headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


async def first_event(url: str, start: dict, **connect) -> dict:
    async with websockets.connect(ws_url(url), **connect) as ws:
        await ws.send(json.dumps({"type": "session.start", **start}))
        return json.loads(await ws.recv())


async def open_sessions(url: str, token: str, n: int, sockets: list) -> None:
    """Open ``n`` live sessions (appended to ``sockets``, which the caller closes)."""
    for _ in range(n):
        ws = await websockets.connect(ws_url(url))
        sockets.append(ws)
        await ws.send(json.dumps({"type": "session.start", "token": token}))
        assert json.loads(await ws.recv())["type"] == "session.started"


@pytest.mark.asyncio(loop_scope="module")
async def test_token_is_required_and_checked(secured_gateway_url):
    missing = await first_event(secured_gateway_url, {})
    assert missing["type"] == "error" and missing["code"] == "authentication_error" and missing["fatal"]
    forged = await first_event(secured_gateway_url, {"token": "v1.abc.99999999999.bad"})
    assert forged["code"] == "authentication_error" and "invalid" in forged["message"]
    good = await first_event(secured_gateway_url, {"token": token_for(secured_gateway_url, "test-key-1")})
    assert good["type"] == "session.started"
    # Integer limits go out as JSON integers (2097152, not 2097152.0); only max_fps is a float.
    limits = good["limits"]
    assert limits["max_message_bytes"] == 2 * 1024 * 1024
    assert all(isinstance(v, int) for k, v in limits.items() if k != "max_fps"), limits
    header = await first_event(
        secured_gateway_url, {}, additional_headers={"Authorization": "Bearer test-key-2"}
    )
    assert header["type"] == "session.started"


def test_token_endpoint_refuses_bad_keys_with_openai_errors(secured_gateway_url):
    reply = httpx.post(f"{secured_gateway_url}/v1/stream/token", headers={"Authorization": "Bearer nope"})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    assert "nope" not in reply.text


@pytest.mark.asyncio(loop_scope="module")
async def test_disallowed_origin_is_refused_and_allowed_one_accepted(secured_gateway_url):
    token = token_for(secured_gateway_url, "test-key-1")
    with pytest.raises(websockets.InvalidStatus) as refused:
        await first_event(secured_gateway_url, {"token": token}, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    ok = await first_event(secured_gateway_url, {"token": token}, origin="http://allowed.example")
    assert ok["type"] == "session.started"


@pytest.mark.asyncio(loop_scope="module")
async def test_sessions_per_key_limit(secured_gateway_url):
    token = token_for(secured_gateway_url, "test-key-2")
    sockets = []
    try:
        await open_sessions(secured_gateway_url, token, 2, sockets)
        third = await first_event(secured_gateway_url, {"token": token})
        assert third["code"] == "rate_limit_error" and "max_sessions_per_key" in third["message"]
        other_key = await first_event(
            secured_gateway_url, {"token": token_for(secured_gateway_url, "test-key-1")}
        )
        assert other_key["type"] == "session.started"
    finally:
        for ws in sockets:
            await ws.close()
    await asyncio.sleep(0.5)  # detach ends the sessions
    again = await first_event(secured_gateway_url, {"token": token})
    assert again["type"] == "session.started"


@pytest.mark.asyncio(loop_scope="module")
async def test_resume_of_another_keys_session_is_refused(secured_gateway_url):
    """A refused resume touches nothing: the owner's live connection stays attached (no takeover,
    no wait), and no session lease is taken or left behind for a session that does not exist."""
    import redis

    owner = await websockets.connect(ws_url(secured_gateway_url))
    try:
        await owner.send(
            json.dumps({"type": "session.start", "token": token_for(secured_gateway_url, "test-key-1")})
        )
        started = json.loads(await owner.recv())
        assert started["type"] == "session.started"
        stolen = await first_event(
            secured_gateway_url,
            {"token": token_for(secured_gateway_url, "test-key-2"), "session_id": started["session_id"]},
        )
        assert stolen["code"] == "permission_error"
        ahead = await first_event(
            secured_gateway_url,
            {
                "token": token_for(secured_gateway_url, "test-key-1"),
                "session_id": started["session_id"],
                "last_event_id": 10**6,
            },
        )
        assert ahead["code"] == "invalid_request_error" and ahead["param"] == "last_event_id"
        # the owner's connection still holds the lease (under the gateway's redis_key_prefix) ...
        holder = f"{SECURED_PREFIX}:session:{started['session_id']}:holder"
        assert redis.Redis.from_url("redis://127.0.0.1:6379/0").exists(holder)
        # ... and is still served (not taken over): a bad message gets its error event
        await owner.send(json.dumps({"type": "no.such.message"}))
        reply = json.loads(await asyncio.wait_for(owner.recv(), 10))
        assert reply["type"] == "error" and not reply["fatal"]
    finally:
        await owner.close()
    unknown = await first_event(
        secured_gateway_url, {"token": token_for(secured_gateway_url, "test-key-1"), "session_id": "nope"}
    )
    assert unknown["code"] == "not_found_error"
    await asyncio.sleep(0.3)
    assert redis.Redis.from_url("redis://127.0.0.1:6379/0").keys("*:session:nope*") == []  # under any prefix


@pytest.mark.asyncio(loop_scope="module")
async def test_sessions_without_media_stop_counting_when_they_detach(secured_gateway_url):
    token = token_for(secured_gateway_url, "test-key-2")  # max_sessions_per_key = 2
    for _ in range(3):
        started = await first_event(
            secured_gateway_url, {"token": token, "config": {"audio": None, "video": None}}
        )
        assert started["type"] == "session.started"
        await asyncio.sleep(0.3)  # detach ends it
    assert (await first_event(secured_gateway_url, {"token": token}))["type"] == "session.started"


def test_tokens_expire_and_keys_are_never_in_tokens():
    auth = Authenticator(GatewaySettings(api_keys=["secret-key"], token_secret="s", token_ttl_s=60))
    token, expires = auth.mint_token(key_id("secret-key"), now=1000.0)
    assert "secret-key" not in token and expires == 1060
    assert auth.check_token(token, now=1059.0) == key_id("secret-key")
    with pytest.raises(Unauthenticated, match="expired"):
        auth.check_token(token, now=1061.0)
    other = Authenticator(GatewaySettings(api_keys=["secret-key"], token_secret="other", token_ttl_s=60))
    with pytest.raises(Unauthenticated, match="invalid"):
        other.check_token(token, now=1000.0)


def test_outbound_coalesces_partials_for_a_slow_client():
    out = Outbound(max_events=4)
    for i in range(4):
        out.put({"type": "caption.partial", "event_id": i + 1, "segment_id": 0, "text": "x" * i})
    assert out.put({"type": "caption.final", "event_id": 5, "segment_id": 0, "text": "final"})
    assert [e["event_id"] for e in out.queue] == [5] and out.coalesced == 4 and not out.overflowed
    for i in range(4):
        out.put({"type": "caption.final", "event_id": 6 + i, "segment_id": i + 1, "text": "f"})
    assert out.overflowed  # finals are never dropped: the client must resume instead
    assert "max_outbound_events" in out.close_reason


def test_outbound_counts_what_the_socket_holds_and_notices_a_stalled_client():
    """Pure logic with a stand-in probe: events written but not acknowledged count as backlog."""
    unacked = [0]
    now = [0.0]
    out = Outbound(max_events=8, unacked_bytes=lambda: unacked[0], stall_timeout_s=5.0, clock=lambda: now[0])
    sizes = []
    for i in range(4):  # written, none taken yet
        text = json.dumps({"type": "caption.partial", "event_id": i + 1})
        out.sent(text)
        sizes.append(len(text) + 2)  # a small text frame has a 2-byte header
        unacked[0] += sizes[-1]
    assert out.in_flight() == 4 and not out.can_send()  # half the budget sits in the socket
    for i in range(4):
        out.put({"type": "caption.partial", "event_id": 5 + i})
    assert out.put({"type": "caption.final", "event_id": 9})  # backlog 8: queued partials coalesced
    assert [e["event_id"] for e in out.queue] == [9] and out.backlog() == 5
    now[0] = 4.0
    assert not out.stalled()
    unacked[0] -= sizes[0] + 1  # the client took one event and a byte of the next: progress
    now[0] = 8.0
    assert out.in_flight() == 3 and not out.stalled()
    now[0] = 13.5  # nothing taken for 5.5 s while events wait
    assert out.stalled() and "slow_client_timeout_s" in out.close_reason


@pytest.mark.asyncio(loop_scope="module")
async def test_backlog_warns_then_refuses_audio_explicitly(backends, librivox_clips):
    from gemma_mesh.model.audio_io import decode_audio

    settings = backends.gateway_settings(max_pending_audio_s=1.0, max_audio_chunk_ms=2000)
    audio = np.concatenate([decode_audio(p, 16000) for p in librivox_clips[:3]])
    pcm = (audio * 32767).astype("<i2").tobytes()
    with GatewayThread(settings) as url:
        async with websockets.connect(ws_url(url), max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start"}))
            assert json.loads(await ws.recv())["type"] == "session.started"
            chunk = 2 * 16000 * 2  # 2 s per message, as fast as the socket takes them
            sent = 0
            for offset in range(0, len(pcm), chunk):
                await ws.send(pack_media(MediaKind.AUDIO, offset // 32, pcm[offset : offset + chunk]))
                sent += 1
            await ws.send(json.dumps({"type": "session.end"}))
            events = []
            async with asyncio.timeout(120):
                while not events or events[-1]["type"] != "session.ended":
                    events.append(json.loads(await ws.recv()))
    warnings = [e for e in events if e["type"] == "warning" and e["code"] == "backlog"]
    refused = [e for e in events if e["type"] == "error" and e["code"] == "overloaded_error"]
    assert warnings, "falling behind must be announced"
    first_refusal = next(i for i, e in enumerate(events) if e in refused)
    assert events.index(warnings[0]) < first_refusal, "the warning comes before any refusal"
    assert refused and all("audio refused" in e["message"] and e["param"] == "audio" for e in refused)
    assert all(re.search(r"audio message at \d+ ms", e["message"]) for e in refused)  # which one
    assert [e for e in events if e["type"] == "caption.final"], "accepted audio is still captioned"


@pytest.mark.asyncio(loop_scope="module")
async def test_stream_client_without_a_key_is_told_how_to_give_one(secured_gateway_url, librivox_clips):
    from gemma_mesh.common.errors import InvalidRequest
    from gemma_mesh.stream_client import StreamOptions, stream

    with pytest.raises(InvalidRequest, match="--api-key or GEMMA_MESH_API_KEY"):
        await stream(StreamOptions(audio=librivox_clips[0], url=secured_gateway_url))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_resume_counts_against_the_sessions_per_key_limit(secured_gateway_url):
    token = token_for(secured_gateway_url, "test-key-2")  # max_sessions_per_key = 2
    first = await first_event(secured_gateway_url, {"token": token})  # then detached
    assert first["type"] == "session.started"
    await asyncio.sleep(0.3)
    sockets = []
    try:
        await open_sessions(secured_gateway_url, token, 2, sockets)
        resumed = await first_event(secured_gateway_url, {"token": token, "session_id": first["session_id"]})
        assert resumed["code"] == "rate_limit_error" and "max_sessions_per_key" in resumed["message"]
        await sockets.pop().close()
        await asyncio.sleep(0.3)
        again = await first_event(
            secured_gateway_url,
            {"token": token, "session_id": first["session_id"], "last_event_id": first["event_id"]},
        )
        assert again["type"] == "session.started" and again["resumed"]
    finally:
        for ws in sockets:
            await ws.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_burst_of_opens_on_two_replicas_admits_exactly_the_limit(backends):
    """30 sockets open at once, alternating between two gateway processes on one Redis (auth off:
    one shared key, max_sessions_per_key 6): exactly 6 sessions start, the rest get a fatal
    rate_limit_error, and closing them frees the places."""
    import uuid

    env = {
        "GEMMA_MESH_GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0",
        "GEMMA_MESH_GATEWAY_REDIS_KEY_PREFIX": f"gemma-mesh-test-burst-{uuid.uuid4().hex[:8]}",
        "GEMMA_MESH_GATEWAY_MAX_SESSIONS_PER_KEY": "6",
    }
    replicas = [GatewayProcess(backends, **env) for _ in range(2)]
    sockets = []

    async def open_one(url: str) -> dict:
        ws = await websockets.connect(ws_url(url))
        sockets.append(ws)
        await ws.send(json.dumps({"type": "session.start"}))
        return json.loads(await asyncio.wait_for(ws.recv(), 60))

    try:
        urls = [replica.start() for replica in replicas]
        firsts = await asyncio.gather(*(open_one(urls[i % 2]) for i in range(30)))
        started = [e for e in firsts if e["type"] == "session.started"]
        refused = [e for e in firsts if e["type"] == "error"]
        assert len(started) == 6 and len(refused) == 24, [e["type"] for e in firsts]
        assert all(e["code"] == "rate_limit_error" and e["fatal"] for e in refused)
        assert all("max_sessions_per_key" in e["message"] for e in refused)
        for ws in sockets:
            await ws.close()
        sockets.clear()
        await asyncio.sleep(1.0)  # each replica detaches its sessions: they stop counting
        again = await asyncio.gather(*(open_one(urls[i % 2]) for i in range(6)))
        assert [e["type"] for e in again] == ["session.started"] * 6
    finally:
        for ws in sockets:
            await ws.close()
        for replica in replicas:
            replica.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_that_stops_reading_is_coalesced_then_closed_1013_and_resumes(
    backends, librivox_clips
):
    """A client with a 4 KiB receive buffer that stops reading while it streams speech: its backlog
    is what it has not taken, partials are coalesced, and it is closed with 1013 and a reason well
    before the keepalive (20 s + 20 s) would cut it; a resume replays every event it missed."""
    import socket
    import time

    from gemma_mesh.model.audio_io import decode_audio

    settings = backends.gateway_settings(
        max_outbound_events=8, slow_client_timeout_s=4.0, partial_interval_ms=100
    )
    audio = np.concatenate([decode_audio(p, 16000) for p in librivox_clips[:2]])
    pcm = (audio * 32767).astype("<i2").tobytes()
    with GatewayThread(settings) as url:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # Linux makes it its minimum
        sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        ws = await websockets.connect(ws_url(url), sock=sock, max_size=None, max_queue=2, ping_interval=None)
        await ws.send(json.dumps({"type": "session.start"}))
        started = json.loads(await ws.recv())
        assert started["type"] == "session.started"
        stopped_reading = time.monotonic()
        chunk = 6400  # 200 ms, at twice real time; nothing is read for 16 s
        with contextlib.suppress(websockets.ConnectionClosed):
            for offset in range(0, len(pcm), chunk):
                await ws.send(pack_media(MediaKind.AUDIO, offset // 32, pcm[offset : offset + chunk]))
                await asyncio.sleep(0.1)
        await asyncio.sleep(max(0.0, 16 - (time.monotonic() - stopped_reading)))
        received = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(30):
                while True:
                    received.append(json.loads(await ws.recv()))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013, (closed.value, len(received))
        assert closed.value.rcvd.reason.startswith("client too slow"), closed.value.rcvd.reason
        ids = [e["event_id"] for e in received]
        assert ids[0] == 2 and ids == sorted(set(ids))  # in order; coalesced partials never left
        metrics = httpx.get(f"{url}/metrics").text
        for code in ("events_coalesced", "slow_client_closed"):  # partials coalesced, then closed
            assert re.search(rf'^gemma_mesh_gateway_warnings_total{{code="{code}"}} [1-9]', metrics, re.M), (
                code
            )

        # The session's log has everything: a resume replays exactly what this client did not get.
        async with websockets.connect(ws_url(url), max_size=None) as again:
            await again.send(
                json.dumps({"type": "session.start", "session_id": started["session_id"], "last_event_id": 1})
            )
            replayed = []
            async with asyncio.timeout(60):
                while not replayed or replayed[-1]["type"] != "session.started":
                    replayed.append(json.loads(await again.recv()))
        # (this socket's backlog is bounded too: superseded partials of the replay may be coalesced)
        log_ids = [e["event_id"] for e in replayed[:-1]]
        assert log_ids[0] == 2 and log_ids == sorted(set(log_ids)) and replayed[-1]["resumed"]
        kept = {e["event_id"] for e in received if e["type"] != "caption.partial"}
        assert kept <= set(log_ids)
        assert [e for e in replayed if e["type"] == "caption.final" and e["event_id"] > ids[-1]]
