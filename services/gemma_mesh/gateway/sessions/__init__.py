"""The gateway's session store: each live session's meta, config, state and capped event log.

A session has an id (url-safe random, made by the store), an owner (API key id), a config and a
state (JSON objects) and an append-only event log whose ids the store assigns: 1, 2, 3... per
session, written into each event as ``event_id``. A client that reconnects with its session id
and last event id gets the missed events from ``events_after``, on any replica when Redis is used.

API (all coroutines but ``healthy``; ``SessionStore`` in ``base.py`` documents each):

- ``create(owner, config, ttl_s=None, *, max_active=None) -> SessionRecord``: with ``max_active``,
  admitted atomically within the owner's limit of active sessions (across replicas with Redis)
- ``get(session_id) -> SessionRecord | None``
- ``update_config(session_id, config)``, ``save_state(session_id, state)``: replace the dict
- ``append(session_id, event) -> int``: the event id (also set in ``event["event_id"]``)
- ``events_after(session_id, last_event_id, limit=1000) -> list[dict]``: ascending ids
- ``end(session_id)`` / ``reopen(session_id, *, max_active=None)``: leave / rejoin the owner's
  active sessions (a rejoin within ``max_active``, as ``create``)
- ``count_active(owner) -> int``: sessions neither ended nor expired (per-key limit)
- ``touch(session_id)``: refresh the TTL (writes refresh it too)
- ``ping() -> float``: latency in seconds; ``close()``; ``healthy``: backing store reachable

Limits (constructor arguments): ``max_events`` (events kept per session, default 10000), ``ttl_s``
(seconds a session lives after its last write or touch, default 3600), ``max_buffered_events``
(Redis only: unwritten events per session during an outage, default 10000).

Errors: ``NotFound`` (unknown or expired session), ``TooManySessions`` (a ``RateLimited``:
``max_active`` reached), ``StoreUnavailable`` (an ``Overloaded``: Redis is
unreachable and the data is not in memory, or the write-behind buffer is full), ``TypeError``
(a config, state or event that is not a JSON-encodable dict).

``MemorySessionStore`` (``memory.py``) serves one replica; ``RedisSessionStore`` (``redis_store.py``)
shares sessions between replicas and keeps working through Redis outages. ``open_store`` picks one.
"""

from __future__ import annotations

from typing import Any

from gemma_mesh.gateway.sessions.base import (
    DEFAULT_EVENTS_AFTER_LIMIT,
    DEFAULT_MAX_BUFFERED_EVENTS,
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    Observe,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    TooManySessions,
)
from gemma_mesh.gateway.sessions.memory import MemorySessionStore
from gemma_mesh.gateway.sessions.redis_store import RedisSessionStore

__all__ = [
    "DEFAULT_EVENTS_AFTER_LIMIT",
    "DEFAULT_MAX_BUFFERED_EVENTS",
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_TTL_S",
    "MemorySessionStore",
    "Observe",
    "RedisSessionStore",
    "SessionRecord",
    "SessionStore",
    "StoreUnavailable",
    "TooManySessions",
    "open_store",
]

_MEMORY_ARGS = frozenset({"max_events", "ttl_s"})  # the others (prefix, observe, ...) are Redis-only


def open_store(redis_url: str | None, **limits: Any) -> SessionStore:
    """``RedisSessionStore(redis_url, **limits)``, or a ``MemorySessionStore`` when ``redis_url`` is
    empty (which takes ``max_events`` and ``ttl_s`` and ignores the Redis-only arguments).

    Raises:
        TypeError: an argument neither store takes.
    """
    if redis_url:
        return RedisSessionStore(redis_url, **limits)
    unknown = set(limits) - _MEMORY_ARGS - set(RedisSessionStore.__init__.__kwdefaults__ or {})
    if unknown:
        raise TypeError(f"open_store() got unexpected arguments: {sorted(unknown)}")
    return MemorySessionStore(**{k: v for k, v in limits.items() if k in _MEMORY_ARGS})
