"""Redis session store: sessions shared by every gateway replica, with write-behind through outages.

Keys and the Lua scripts that keep them consistent: ``redis_lua.py``.

Outages: each replica holds its live sessions in memory (meta, config, state, the newest
``recent_events`` events and every event not yet written). While Redis is unreachable, writes only
go there (ids continue from the last known one), reads are served from there, and a background task
retries with exponential backoff; when Redis answers again it writes the buffered changes in order,
re-creating any session Redis lost (restart without persistence: detected by a missing hash or a new
``run_id``). Writes fail with ``StoreUnavailable`` once a session holds ``max_buffered_events``
unwritten events. Ids assigned during an outage are final: if another replica wrote the same
session meanwhile, the events Redis already holds win and the clashing buffered ones are logged
and dropped (a live session is written by one replica at a time, so this needs a failover during
an outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gemma_mesh.common.errors import NotFound
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.sessions.base import (
    DEFAULT_EVENTS_AFTER_LIMIT,
    DEFAULT_MAX_BUFFERED_EVENTS,
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    LocalSession,
    Observe,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    TooManySessions,
    decode_event,
    dumps,
    encode_event,
    json_copy,
    new_session_id,
)
from gemma_mesh.gateway.sessions.redis_lua import ADMIT_LUA, APPEND_LUA, RESTORE_LUA, UPDATE_LUA

log = get_logger("gateway.sessions")

DEFAULT_RECENT_EVENTS = 1000
"""Newest events of each live session kept in memory to re-seed Redis after it lost them."""
DEFAULT_OP_TIMEOUT_S = 1.0
"""Connect and read timeout of one Redis operation, in seconds (no retries: failures buffer)."""
DEFAULT_RETRY_MAX_S = 2.0
"""Longest wait between two reconnection attempts, in seconds (starting at ``RETRY_MIN_S``)."""
DEFAULT_HEALTH_INTERVAL_S = 5.0
"""Seconds between two checks of Redis's ``run_id`` (a restart may have lost sessions)."""
RETRY_MIN_S = 0.05
FLUSH_CHUNK_EVENTS = 500
"""Buffered events written by one script call."""

_TRANSIENT_REPLIES = ("LOADING", "MISCONF", "MASTERDOWN", "TRYAGAIN", "OOM", "READONLY")


class _Down(Exception):
    """Internal: a Redis operation failed for want of Redis (the caller falls back to memory)."""


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ReadOnlyError | OSError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(eq=False)
class _Mirror(LocalSession):
    """This replica's copy of a session; events above ``flushed_upto`` are not in Redis yet."""

    flushed_upto: int = 0
    dirty: set[str] = field(default_factory=set)
    needs_full: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def pending(self) -> int:
        return len(self.events) - self.index_after(self.flushed_upto)

    def clean(self) -> bool:
        return not self.needs_full and not self.dirty and self.pending() == 0

    def trim(self, keep: int) -> None:
        """Keep the newest ``keep`` events, and every unwritten one."""
        excess = len(self.events) - keep
        if excess > 0:
            del self.events[: min(excess, self.index_after(self.flushed_upto))]

    def meta(self) -> dict[str, str]:
        return {
            "owner": self.owner,
            "config": dumps(self.config),
            "state": dumps(self.state),
            "created_at": repr(self.created_at),
            "ttl_ms": str(max(1, round(self.ttl_s * 1000))),
            "ended": "1" if self.ended else "0",
            "seq": str(self.last_event_id),
        }


class RedisSessionStore(SessionStore):
    """Sessions in Redis, shared by all gateway replicas; see the module docstring for the layout.

    Args:
        url: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: first part of every key.
        max_events: events kept per session (stream MAXLEN).
        ttl_s: seconds a session lives after its last write or touch (default for ``create``).
        max_buffered_events: unwritten events one session may hold while Redis is unreachable;
            ``append`` raises ``StoreUnavailable`` beyond it.
        recent_events: newest events per live session kept in memory, written or not (to serve
            ``events_after`` during an outage and to re-seed a Redis that lost them).
        op_timeout_s: connect/read timeout of one Redis operation, in seconds.
        retry_max_s: longest backoff between reconnection attempts, in seconds.
        health_interval_s: seconds between two Redis restart checks (``INFO server`` run_id).
        observe: ``observe(op, seconds, ok)`` called after every Redis operation.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gemma-mesh",
        max_events: int = DEFAULT_MAX_EVENTS,
        ttl_s: float = DEFAULT_TTL_S,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        recent_events: int = DEFAULT_RECENT_EVENTS,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        retry_max_s: float = DEFAULT_RETRY_MAX_S,
        health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S,
        observe: Observe | None = None,
    ) -> None:
        if min(max_events, max_buffered_events, recent_events) < 1 or min(ttl_s, op_timeout_s) <= 0:
            raise ValueError("max_events, max_buffered_events and recent_events must be >= 1; timeouts > 0")
        self.max_events = max_events
        self.ttl_s = ttl_s
        self.max_buffered_events = max_buffered_events
        self.recent_events = recent_events
        self.retry_max_s = retry_max_s
        self.health_interval_s = health_interval_s
        self._prefix = f"{prefix}:"
        self._observe = observe
        # No client-side retries: a failed operation is buffered at once and retried in the background.
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=op_timeout_s,
            socket_connect_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._append_lua = self._redis.register_script(APPEND_LUA)
        self._update_lua = self._redis.register_script(UPDATE_LUA)
        self._restore_lua = self._redis.register_script(RESTORE_LUA)
        self._admit_lua = self._redis.register_script(ADMIT_LUA)
        self._mirrors: dict[str, _Mirror] = {}
        self._healthy = True
        self._closed = False
        self._run_id: str | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._healthy

    # --- Redis calls ---------------------------------------------------------------------------

    def _keys(self, session_id: str) -> list[str]:
        base = f"{self._prefix}session:{session_id}"
        return [f"{base}:meta", f"{base}:events"]

    def _report(self, op: str, seconds: float, ok: bool) -> None:
        if self._observe is not None:
            try:
                self._observe(op, seconds, ok)
            except Exception:
                log.exception("session store observe hook failed", op=op)

    async def _call(self, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis operation; an outage raises ``_Down`` and starts the recovery task."""
        started = time.perf_counter()
        try:
            result = await fn()
        except Exception as exc:
            self._report(op, time.perf_counter() - started, False)
            if not _is_outage(exc):
                raise
            if self._healthy:
                log.warning(
                    "session store unreachable; buffering writes in memory",
                    op=op,
                    error=str(exc) or type(exc).__name__,
                )
                self._healthy = False
            self._start_recovery()
            raise _Down(op) from exc
        self._report(op, time.perf_counter() - started, True)
        return result

    async def _pipe(self, op: str, build: Callable[[Any], Any]) -> list[Any]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                build(pipe)
                return await pipe.execute()

        return await self._call(op, run)

    # --- background work -----------------------------------------------------------------------

    def _start_recovery(self) -> None:
        if not self._closed and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _data_lost(self, why: str) -> None:
        """Redis answers but lost sessions (restart without persistence, eviction): re-write them."""
        if self._healthy:
            log.warning(
                "Redis lost sessions held here; re-writing them", reason=why, sessions=len(self._mirrors)
            )
            self._healthy = False
        self._start_recovery()

    def _start_watchdog(self) -> None:
        if not self._closed and self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _recover(self) -> None:
        delay = RETRY_MIN_S
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                info = await self._call("info", lambda: self._redis.info("server"))
                self._run_id = info.get("run_id")
                await self._flush_all()
            except _Down:
                delay = min(delay * 2, self.retry_max_s)
                continue
            except Exception:
                log.exception("session store recovery failed; retrying")
                delay = min(delay * 2, self.retry_max_s)
                continue
            delay = RETRY_MIN_S
            if all(m.clean() for m in self._mirrors.values()):
                self._healthy = True
                log.info(
                    "session store reachable again; buffered writes flushed", sessions=len(self._mirrors)
                )
                return

    async def _watch(self) -> None:
        while not self._closed:
            self._sweep()
            if self._healthy:
                try:
                    info = await self._call("info", lambda: self._redis.info("server"))
                except _Down:
                    pass
                except Exception:
                    log.exception("session store health check failed")
                else:
                    run_id = info.get("run_id")
                    if self._run_id is not None and run_id != self._run_id:
                        self._data_lost("Redis restarted (new run_id)")
                    self._run_id = run_id
            await asyncio.sleep(self.health_interval_s)

    def _sweep(self) -> None:
        for m in [m for m in self._mirrors.values() if m.expired()]:
            self._drop(m)

    def _drop(self, m: _Mirror) -> None:
        if self._mirrors.get(m.session_id) is m:
            del self._mirrors[m.session_id]
            if m.pending():
                log.warning(
                    "session expired while Redis was unreachable; its unwritten events are dropped",
                    session_id=m.session_id,
                    events=m.pending(),
                )

    async def _flush_all(self) -> None:
        for m in list(self._mirrors.values()):
            if m.expired():
                self._drop(m)
                continue
            async with m.lock:
                await self._flush(m)
            if m.ended and m.clean():
                self._drop(m)

    async def _flush(self, m: _Mirror) -> None:
        """Write the session's unwritten changes (all it holds when ``needs_full``); hold ``m.lock``.

        Raises:
            _Down: Redis is unreachable (what was written stays written).
        """
        full = m.needs_full
        while True:
            batch = m.events if full else m.events[m.index_after(m.flushed_upto) :]
            meta, dirty = dumps(m.meta()), dumps(sorted(m.dirty))
            for start in range(0, max(len(batch), 1), FLUSH_CHUNK_EVENTS):
                chunk = batch[start : start + FLUSH_CHUNK_EVENTS]
                args: list[Any] = [
                    self._prefix,
                    m.session_id,
                    _now_ms(),
                    self.max_events,
                    int(full),
                    meta,
                    dirty,
                ]
                for event_id, payload in chunk:
                    args += [event_id, payload]
                status, _, _, skipped, recreated = await self._call(
                    "flush", lambda args=args: self._restore_lua(keys=self._keys(m.session_id), args=args)
                )
                if status == -1:  # Redis lost the session: re-create it with all we hold
                    break
                if chunk:
                    m.flushed_upto = max(m.flushed_upto, chunk[-1][0])
                if recreated and m.flushed_upto:
                    log.warning(
                        "session re-created in Redis from memory", session_id=m.session_id, events=len(batch)
                    )
                if skipped:
                    log.warning(
                        "buffered events clash with events another writer stored; kept Redis's",
                        session_id=m.session_id,
                        events=skipped,
                    )
            else:
                break
            full = True
        m.dirty.clear()
        m.needs_full = False

    # --- held sessions -------------------------------------------------------------------------

    def _held(self, session_id: str) -> _Mirror | None:
        m = self._mirrors.get(session_id)
        if m is not None and m.expired():
            self._drop(m)
            return None
        return m

    def _adopt(self, session_id: str, h: dict[str, str], pttl_ms: int) -> _Mirror:
        """Hold (or refresh the copy of) a session read from Redis."""
        seq = int(h.get("seq", 0))
        m = self._held(session_id)
        if m is None:
            m = _Mirror(
                session_id=session_id,
                owner=h["owner"],
                config={},
                state={},
                created_at=float(h["created_at"]),
                ttl_s=int(h["ttl_ms"]) / 1000,
                last_event_id=seq,
                flushed_upto=seq,
            )
            self._mirrors[session_id] = m
        for name in ("config", "state"):
            if name not in m.dirty:
                setattr(m, name, json.loads(h[name]))
        if "ended" not in m.dirty:
            m.ended = h.get("ended") == "1"
        m.last_event_id = max(m.last_event_id, seq)
        m.refresh(pttl_ms / 1000 if pttl_ms > 0 else None)
        return m

    async def _mirror(self, session_id: str) -> _Mirror:
        """The held session for a write, read from Redis when not held.

        Raises:
            NotFound: no such session. StoreUnavailable: Redis is unreachable and it is not held.
        """
        m = self._held(session_id)
        if m is not None:
            return m
        if await self.get(session_id) is None:
            raise NotFound(f"session {session_id!r} does not exist or expired", param="session_id")
        return self._mirrors[session_id]

    async def _update(self, session_id: str, op: str, **changes: Any) -> None:
        """Set ``changes`` (config, state, ended) on the held session and write them; refresh the TTL."""
        self._start_watchdog()
        m = await self._mirror(session_id)
        async with m.lock:
            for name, value in changes.items():
                setattr(m, name, value)
            m.dirty.update(changes)
            m.refresh()
            if self._healthy and not m.needs_full and not m.pending():
                meta = m.meta()
                args = [self._prefix, session_id, _now_ms()]
                for name in sorted(m.dirty):
                    args += [name, meta[name]]
                try:
                    ok = await self._call(
                        op, lambda: self._update_lua(keys=self._keys(session_id), args=args)
                    )
                except _Down:
                    return
                if ok:
                    m.dirty.clear()
                else:
                    self._data_lost(f"{op}: session missing")
        if m.ended and m.clean():
            self._drop(m)

    async def _admit(self, owner: str, session_id: str, ttl_s: float, max_active: int) -> None:
        """Count ``session_id`` among ``owner``'s active sessions unless that makes more than
        ``max_active`` (``ADMIT_LUA``, atomic across replicas). While Redis is unreachable the
        sessions this replica holds are counted instead (a lower bound, as ``count_active``).

        Raises:
            TooManySessions: the limit is reached.
        """
        index = f"{self._prefix}owner:{owner}:active"
        if self._healthy:
            args = [session_id, _now_ms(), max(1, round(ttl_s * 1000)), max_active]
            try:
                admitted = await self._call("admit", lambda: self._admit_lua(keys=[index], args=args))
            except _Down:
                pass
            else:
                if not admitted:
                    raise TooManySessions(max_active)
                return
        self._sweep()
        held = sum(1 for m in self._mirrors.values() if m.owner == owner and not m.ended)
        if held >= max_active:
            raise TooManySessions(max_active)

    # --- SessionStore --------------------------------------------------------------------------

    async def create(
        self, owner: str, config: dict[str, Any], ttl_s: float | None = None, *, max_active: int | None = None
    ) -> SessionRecord:
        self._start_watchdog()
        ttl_s = self._session_ttl(ttl_s)
        session_id = new_session_id()
        if max_active is not None:
            await self._admit(owner, session_id, ttl_s, max_active)
        m = _Mirror(
            session_id=session_id,
            owner=owner,
            config=json_copy(config, "config"),
            state={},
            created_at=time.time(),
            ttl_s=ttl_s,
            needs_full=True,
        )
        self._sweep()
        self._mirrors[m.session_id] = m
        async with m.lock:
            if self._healthy:
                with contextlib.suppress(_Down):
                    await self._flush(m)
        return m.record()

    async def get(self, session_id: str) -> SessionRecord | None:
        """The session (Redis first, then this replica's copy).

        Raises:
            StoreUnavailable: Redis is unreachable and this replica does not hold the session.
        """
        self._start_watchdog()
        meta_key = self._keys(session_id)[0]
        if self._healthy:
            try:
                h, pttl = await self._pipe("get", lambda p: p.hgetall(meta_key).pttl(meta_key))
            except _Down:
                pass
            else:
                if h:
                    return self._adopt(session_id, h, int(pttl)).record()
                m = self._held(session_id)
                if m is None:
                    return None
                self._data_lost("get: session missing")
                return m.record()
        m = self._held(session_id)
        if m is None:
            raise StoreUnavailable("the session store (Redis) is unreachable; retry later")
        return m.record()

    async def update_config(self, session_id: str, config: dict[str, Any]) -> None:
        await self._update(session_id, "update_config", config=json_copy(config, "config"))

    async def save_state(self, session_id: str, state: dict[str, Any]) -> None:
        await self._update(session_id, "save_state", state=json_copy(state, "state"))

    async def end(self, session_id: str) -> None:
        await self._update(session_id, "end", ended=True)

    async def reopen(self, session_id: str, *, max_active: int | None = None) -> None:
        if max_active is not None:
            m = await self._mirror(session_id)
            if m.ended:
                await self._admit(m.owner, session_id, m.ttl_s, max_active)
        await self._update(session_id, "reopen", ended=False)

    async def touch(self, session_id: str) -> None:
        await self._update(session_id, "touch")

    async def append(self, session_id: str, event: dict[str, Any]) -> int:
        """See ``SessionStore.append``.

        Raises:
            StoreUnavailable: Redis is unreachable and the session's write-behind buffer is full
                (``max_buffered_events``), or this replica does not hold the session.
        """
        self._start_watchdog()
        payload = encode_event(event)
        m = await self._mirror(session_id)
        async with m.lock:
            event_id = None
            if self._healthy and m.clean():
                args = [self._prefix, session_id, _now_ms(), self.max_events, payload]
                try:
                    event_id = await self._call(
                        "append", lambda: self._append_lua(keys=self._keys(session_id), args=args)
                    )
                except _Down:
                    event_id = None
                else:
                    if event_id == -1:
                        self._data_lost("append: session missing")
                        event_id = None
                    else:
                        m.flushed_upto = max(m.flushed_upto, event_id)
            if event_id is None:
                if m.pending() >= self.max_buffered_events:
                    raise StoreUnavailable(
                        f"session {session_id!r} holds {m.pending()} events that Redis has not taken "
                        f"(max_buffered_events={self.max_buffered_events}); retry later"
                    )
                event_id = m.last_event_id + 1
            m.add_event(event_id, payload)
            m.trim(self.recent_events)
            m.refresh()
        event["event_id"] = event_id
        return event_id

    async def events_after(
        self, session_id: str, last_event_id: int, limit: int = DEFAULT_EVENTS_AFTER_LIMIT
    ) -> list[dict[str, Any]]:
        """See ``SessionStore.events_after``. While Redis is unreachable, serves the events this
        replica holds (the newest ``recent_events`` and all unwritten ones).

        Raises:
            NotFound: no such session. StoreUnavailable: Redis is unreachable and it is not held.
        """
        self._start_watchdog()
        if limit <= 0:
            return []
        meta_key, events_key = self._keys(session_id)
        start = f"0-{max(0, last_event_id) + 1}"
        if self._healthy:
            try:
                exists, entries = await self._pipe(
                    "events_after", lambda p: p.exists(meta_key).xrange(events_key, start, "+", count=limit)
                )
            except _Down:
                pass
            else:
                if exists:
                    return [decode_event(int(i.split("-", 1)[1]), f["e"]) for i, f in entries]
                if self._held(session_id) is None:
                    raise NotFound(f"session {session_id!r} does not exist or expired", param="session_id")
                self._data_lost("events_after: session missing")
        m = self._held(session_id)
        if m is None:
            raise StoreUnavailable("the session store (Redis) is unreachable; retry later")
        return m.events_after(last_event_id, limit)

    async def count_active(self, owner: str) -> int:
        """See ``SessionStore.count_active``; while Redis is unreachable, counts the sessions this
        replica holds (a lower bound)."""
        self._start_watchdog()
        index = f"{self._prefix}owner:{owner}:active"
        if self._healthy:
            try:
                _, count = await self._pipe(
                    "count_active", lambda p: p.zremrangebyscore(index, "-inf", _now_ms()).zcard(index)
                )
                return int(count)
            except _Down:
                pass
        self._sweep()
        return sum(1 for m in self._mirrors.values() if m.owner == owner and not m.ended)

    async def ping(self) -> float:
        started = time.perf_counter()
        try:
            await self._call("ping", self._redis.ping)
        except _Down as exc:
            raise StoreUnavailable("the session store (Redis) is unreachable") from exc
        return time.perf_counter() - started

    async def close(self) -> None:
        self._closed = True
        for task in (self._watchdog, self._recovery):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        unwritten = [m for m in self._mirrors.values() if not m.clean()]
        try:
            for m in unwritten:  # one last try; the first failure ends it
                async with m.lock:
                    await self._flush(m)
        except _Down:
            pass
        left = sum(m.pending() for m in unwritten)
        if left:
            log.warning("session store closed with events Redis has not taken", events=left)
        self._mirrors.clear()
        await self._redis.aclose()
