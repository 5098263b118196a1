"""Session stores against a real Redis: the shared one on 127.0.0.1:6379 (keys under a unique
prefix) and, for restarts, a redis-server of each test's own on a free port."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from gemma_mesh.common.errors import NotFound, Overloaded
from gemma_mesh.gateway.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    StoreUnavailable,
    TooManySessions,
    open_store,
)
from tests.gateway.redis_server import RedisServer

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
WAIT_S = 15.0


@pytest.fixture
def redis_server(tmp_path: Path):
    servers: list[RedisServer] = []

    def make(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", *args)
        (tmp_path / f"redis{len(servers)}").mkdir()
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    prefix = f"gemma-mesh-test:{uuid.uuid4().hex}"
    yield prefix
    client = aioredis.Redis.from_url(SHARED_REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest_asyncio.fixture(params=["memory", "redis"])
async def make_store(request, prefix: str) -> AsyncIterator[Callable[..., SessionStore]]:
    """``make_store(**limits)``: a store of the parametrised kind, closed after the test."""
    stores: list[SessionStore] = []

    def make(**limits) -> SessionStore:
        if request.param == "memory":
            store: SessionStore = MemorySessionStore(**limits)
        else:
            store = RedisSessionStore(SHARED_REDIS_URL, prefix=prefix, **limits)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def ids(events: list[dict]) -> list[int]:
    return [e["event_id"] for e in events]


# --- both stores ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_get_update(make_store) -> None:
    store = make_store()
    record = await store.create("key-1", {"lang": "en"})
    assert len(record.session_id) >= 20 and record.owner == "key-1" and record.config == {"lang": "en"}
    assert record.state == {} and not record.ended and record.last_event_id == 0
    await store.update_config(record.session_id, {"lang": "fr"})
    await store.save_state(record.session_id, {"audio_clock_ms": 1500, "committed": "bonjour"})
    got = await store.get(record.session_id)
    assert got is not None and got.config == {"lang": "fr"}
    assert got.state == {"audio_clock_ms": 1500, "committed": "bonjour"}
    assert await store.get("no-such-session") is None
    with pytest.raises(NotFound):
        await store.append("no-such-session", {"type": "x"})
    with pytest.raises(NotFound):
        await store.events_after("no-such-session", 0)
    with pytest.raises(TypeError):
        await store.save_state(record.session_id, {"bad": object()})


@pytest.mark.asyncio
async def test_append_assigns_ids_and_events_after_returns_the_missed_ones(make_store) -> None:
    store = make_store()
    sid = (await store.create("key-1", {})).session_id
    events = [{"type": "caption.partial", "text": f"word {i}", "t_ms": i * 100} for i in range(10)]
    assert [await store.append(sid, e) for e in events] == list(range(1, 11))
    assert ids(events) == list(range(1, 11))  # written into the caller's dicts
    missed = await store.events_after(sid, 4)
    assert missed == events[4:]
    assert ids(await store.events_after(sid, 4, limit=3)) == [5, 6, 7]
    assert await store.events_after(sid, 10) == []
    assert (await store.get(sid)).last_event_id == 10


@pytest.mark.asyncio
async def test_event_log_keeps_the_newest_max_events(make_store) -> None:
    store = make_store(max_events=5)
    sid = (await store.create("key-1", {})).session_id
    for i in range(12):
        await store.append(sid, {"i": i})
    assert ids(await store.events_after(sid, 0)) == [8, 9, 10, 11, 12]
    assert [e["i"] for e in await store.events_after(sid, 9)] == [9, 10, 11]
    assert await store.append(sid, {"i": 12}) == 13


@pytest.mark.asyncio
async def test_sessions_expire_after_ttl_unless_touched(make_store) -> None:
    store = make_store(ttl_s=1.0)
    idle = (await store.create("key-1", {})).session_id
    kept = (await store.create("key-1", {})).session_id
    await store.append(idle, {"type": "x"})
    assert await store.count_active("key-1") == 2
    await asyncio.sleep(0.6)
    await store.touch(kept)
    await asyncio.sleep(0.6)
    assert await store.get(idle) is None
    assert await store.get(kept) is not None
    assert await store.count_active("key-1") == 1
    with pytest.raises(NotFound):
        await store.append(idle, {"type": "x"})
    with pytest.raises(NotFound):
        await store.events_after(idle, 0)


@pytest.mark.asyncio
async def test_count_active_per_owner_and_end(make_store) -> None:
    store = make_store()
    a1 = (await store.create("key-a", {})).session_id
    await store.create("key-a", {})
    await store.create("key-b", {})
    assert (await store.count_active("key-a"), await store.count_active("key-b")) == (2, 1)
    await store.append(a1, {"type": "caption.final", "text": "hello"})
    await store.end(a1)
    assert await store.count_active("key-a") == 1
    record = await store.get(a1)
    assert record is not None and record.ended
    assert [e["text"] for e in await store.events_after(a1, 0)] == ["hello"]  # kept until the TTL
    await store.reopen(a1)
    assert await store.count_active("key-a") == 2
    assert await store.count_active("key-c") == 0


@pytest.mark.asyncio
async def test_concurrent_creates_and_reopens_stay_within_max_active(make_store) -> None:
    store = make_store()
    outcomes = await asyncio.gather(
        *(store.create("key-a", {}, max_active=5) for _ in range(40)), return_exceptions=True
    )
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(admitted) == 5 and all(isinstance(o, TooManySessions) for o in refused)
    assert "max_sessions_per_key" in refused[0].message and refused[0].code == "rate_limit_error"
    assert await store.count_active("key-a") == 5
    await store.end(admitted[0].session_id)
    await store.end(admitted[1].session_id)
    # Two ended sessions reopened and three new ones at once: two places, whoever comes first.
    outcomes = await asyncio.gather(
        store.reopen(admitted[0].session_id, max_active=5),
        store.reopen(admitted[1].session_id, max_active=5),
        *(store.create("key-a", {}, max_active=5) for _ in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, TooManySessions) for o in outcomes) == 3
    assert await store.count_active("key-a") == 5
    await store.reopen(admitted[2].session_id, max_active=5)  # never ended: already counted
    assert (await store.create("key-b", {}, max_active=1)).owner == "key-b"  # per owner


# --- Redis: replicas, restarts, outages ----------------------------------------------------------


@pytest.mark.asyncio
async def test_two_replicas_admit_a_burst_within_max_active(prefix: str) -> None:
    replicas = [RedisSessionStore(SHARED_REDIS_URL, prefix=prefix) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(
            *(replicas[i % 2].create("key-a", {}, max_active=7) for i in range(50)), return_exceptions=True
        )
        assert sum(not isinstance(o, BaseException) for o in outcomes) == 7
        assert all(isinstance(o, TooManySessions) for o in outcomes if isinstance(o, BaseException))
        assert await replicas[0].count_active("key-a") == await replicas[1].count_active("key-a") == 7
    finally:
        for store in replicas:
            await store.close()


@pytest.mark.asyncio
async def test_two_replicas_share_sessions_and_assign_ids_without_gaps(prefix: str) -> None:
    a = RedisSessionStore(SHARED_REDIS_URL, prefix=prefix)
    b = RedisSessionStore(SHARED_REDIS_URL, prefix=prefix)
    try:
        sid = (await a.create("key-1", {"lang": "en"})).session_id
        seen = await b.get(sid)
        assert seen is not None and seen.owner == "key-1" and seen.config == {"lang": "en"}
        calls = [
            store.append(sid, {"by": name, "i": i})
            for i in range(200)
            for store, name in ((a, "a"), (b, "b"))
        ]
        assigned = await asyncio.gather(*calls)
        assert sorted(assigned) == list(range(1, 401))
        from_a = await a.events_after(sid, 0, limit=1000)
        from_b = await b.events_after(sid, 0, limit=1000)
        assert from_a == from_b and ids(from_a) == list(range(1, 401))
        for name in "ab":  # each replica's events keep the order they were appended in
            assert [e["i"] for e in from_a if e["by"] == name] == list(range(200))
        assert (await a.get(sid)).last_event_id == 400
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_redis_restart_with_aof_keeps_events_and_outage_appends_are_written_after(redis_server) -> None:
    server = redis_server("--appendonly", "yes", "--appendfsync", "always", "--save", "")
    writer = RedisSessionStore(server.url)
    sid = (await writer.create("key-1", {"lang": "en"})).session_id
    for i in range(5):
        await writer.append(sid, {"i": i})
    await writer.close()
    server.kill()
    server.start()
    reader = RedisSessionStore(server.url)
    assert [e["i"] for e in await reader.events_after(sid, 0)] == [0, 1, 2, 3, 4]  # from the AOF
    await reader.close()

    observed: list[tuple[str, bool]] = []
    store = RedisSessionStore(
        server.url, op_timeout_s=0.5, retry_max_s=0.2, observe=lambda op, s, ok: observed.append((op, ok))
    )
    try:
        assert (await store.get(sid)).last_event_id == 5
        server.kill()
        during = [await store.append(sid, {"i": i}) for i in range(5, 10)]
        assert during == [6, 7, 8, 9, 10]
        await store.save_state(sid, {"audio_clock_ms": 4200})
        assert not store.healthy and ("append", False) in observed
        assert ids(await store.events_after(sid, 3)) == [6, 7, 8, 9, 10]  # from memory meanwhile
        server.start()
        await wait_until(lambda: asyncio.sleep(0, store.healthy), "the store to flush its buffer")
        fresh = RedisSessionStore(server.url)
        events = await fresh.events_after(sid, 0)
        assert ids(events) == list(range(1, 11)) and [e["i"] for e in events] == list(range(10))
        assert (await fresh.get(sid)).state == {"audio_clock_ms": 4200}
        assert await store.append(sid, {"i": 10}) == 11
        assert ids(await fresh.events_after(sid, 10)) == [11]
        await fresh.close()
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("lost_by", "noticed_by"), [("restart", "health_check"), ("restart", "append"), ("flushall", "append")]
)
async def test_redis_losing_sessions_rewrites_held_sessions(redis_server, lost_by, noticed_by) -> None:
    """Redis restarted without persistence (or flushed): the replica re-writes what it holds."""
    server = redis_server("--save", "", "--appendonly", "no")
    interval_s = 0.1 if noticed_by == "health_check" else 3600.0
    store = RedisSessionStore(server.url, retry_max_s=0.2, health_interval_s=interval_s)
    fresh = RedisSessionStore(server.url)
    try:
        sid = (await store.create("key-1", {"lang": "en"})).session_id
        for i in range(5):
            await store.append(sid, {"i": i})
        await store.save_state(sid, {"audio_clock_ms": 900})
        if lost_by == "restart":
            server.kill()
            server.start()  # empty
        else:
            with redis.Redis(port=server.port) as admin:
                admin.flushall()
        expected = 5
        if noticed_by == "append":
            assert await store.append(sid, {"i": 5}) == 6
            expected = 6

        async def restored() -> bool:
            return await fresh.get(sid) is not None and len(await fresh.events_after(sid, 0)) == expected

        await wait_until(restored, "the session to be re-written")
        events = await fresh.events_after(sid, 0)
        assert ids(events) == list(range(1, expected + 1)) and [e["i"] for e in events] == list(
            range(expected)
        )
        record = await fresh.get(sid)
        assert record.owner == "key-1" and record.config == {"lang": "en"}
        assert record.state == {"audio_clock_ms": 900} and record.last_event_id == expected
        assert await fresh.count_active("key-1") == 1
        await wait_until(lambda: asyncio.sleep(0, store.healthy), "the store to be healthy")
        assert await store.append(sid, {"i": expected}) == expected + 1
        assert ids(await fresh.events_after(sid, expected)) == [expected + 1]
    finally:
        await store.close()
        await fresh.close()


@pytest.mark.asyncio
async def test_full_write_behind_buffer_raises_store_unavailable(redis_server) -> None:
    server = redis_server("--save", "", "--appendonly", "no")
    store = RedisSessionStore(server.url, max_buffered_events=5, op_timeout_s=0.5)
    try:
        sid = (await store.create("key-1", {})).session_id
        assert await store.append(sid, {"i": 0}) == 1
        server.kill()
        assert [await store.append(sid, {"i": i}) for i in range(1, 6)] == [2, 3, 4, 5, 6]
        with pytest.raises(StoreUnavailable, match="max_buffered_events") as raised:
            await store.append(sid, {"i": 6})
        assert isinstance(raised.value, Overloaded)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert ids(await store.events_after(sid, 0)) == [1, 2, 3, 4, 5, 6]
        with pytest.raises(StoreUnavailable):  # not held by this replica, and Redis is down
            await store.get("some-other-session")
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_open_store_picks_the_store(prefix: str) -> None:
    memory = open_store(None, max_events=10, ttl_s=60, max_buffered_events=5, observe=print)
    assert isinstance(memory, MemorySessionStore) and memory.max_events == 10
    remote = open_store(SHARED_REDIS_URL, prefix=prefix, max_buffered_events=5)
    assert isinstance(remote, RedisSessionStore) and remote.max_buffered_events == 5
    assert await remote.ping() > 0
    await remote.close()
    with pytest.raises(TypeError):
        open_store(None, max_event=10)
