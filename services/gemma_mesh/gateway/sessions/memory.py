"""In-process session store: one gateway replica, local use, tests. Nothing survives a restart."""

from __future__ import annotations

import time
from typing import Any

from gemma_mesh.common.errors import NotFound
from gemma_mesh.gateway.sessions.base import (
    DEFAULT_EVENTS_AFTER_LIMIT,
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    LocalSession,
    SessionRecord,
    SessionStore,
    TooManySessions,
    encode_event,
    json_copy,
    new_session_id,
)


class MemorySessionStore(SessionStore):
    """Sessions in a dict, with the same semantics as ``RedisSessionStore`` (ids, cap, TTL).

    Args:
        max_events: events kept per session; the oldest are dropped beyond it.
        ttl_s: seconds a session lives after its last write or touch (default for ``create``).
    """

    def __init__(self, *, max_events: int = DEFAULT_MAX_EVENTS, ttl_s: float = DEFAULT_TTL_S) -> None:
        if max_events < 1 or ttl_s <= 0:
            raise ValueError(f"max_events must be >= 1 and ttl_s > 0, got {max_events} and {ttl_s}")
        self.max_events = max_events
        self.ttl_s = ttl_s
        self._sessions: dict[str, LocalSession] = {}

    def _sweep(self) -> None:
        for session_id in [s.session_id for s in self._sessions.values() if s.expired()]:
            del self._sessions[session_id]

    def _live(self, session_id: str) -> LocalSession:
        session = self._sessions.get(session_id)
        if session is not None and session.expired():
            del self._sessions[session_id]
            session = None
        if session is None:
            raise NotFound(f"session {session_id!r} does not exist or expired", param="session_id")
        return session

    def _active(self, owner: str) -> int:
        self._sweep()
        return sum(1 for s in self._sessions.values() if s.owner == owner and not s.ended)

    async def create(
        self, owner: str, config: dict[str, Any], ttl_s: float | None = None, *, max_active: int | None = None
    ) -> SessionRecord:
        # No await from the count to the insert: concurrent creates on this event loop are atomic.
        if max_active is not None and self._active(owner) >= max_active:
            raise TooManySessions(max_active)
        ttl_s = self._session_ttl(ttl_s)
        session = LocalSession(
            session_id=new_session_id(),
            owner=owner,
            config=json_copy(config, "config"),
            state={},
            created_at=time.time(),
            ttl_s=ttl_s,
        )
        self._sessions[session.session_id] = session
        return session.record()

    async def get(self, session_id: str) -> SessionRecord | None:
        try:
            return self._live(session_id).record()
        except NotFound:
            return None

    async def update_config(self, session_id: str, config: dict[str, Any]) -> None:
        session = self._live(session_id)
        session.config = json_copy(config, "config")
        session.refresh()

    async def save_state(self, session_id: str, state: dict[str, Any]) -> None:
        session = self._live(session_id)
        session.state = json_copy(state, "state")
        session.refresh()

    async def append(self, session_id: str, event: dict[str, Any]) -> int:
        session = self._live(session_id)
        payload = encode_event(event)
        event_id = session.last_event_id + 1
        session.add_event(event_id, payload)
        if len(session.events) > self.max_events:
            del session.events[: len(session.events) - self.max_events]
        session.refresh()
        event["event_id"] = event_id
        return event_id

    async def events_after(
        self, session_id: str, last_event_id: int, limit: int = DEFAULT_EVENTS_AFTER_LIMIT
    ) -> list[dict[str, Any]]:
        return self._live(session_id).events_after(last_event_id, limit)

    async def end(self, session_id: str) -> None:
        session = self._live(session_id)
        session.ended = True
        session.refresh()

    async def reopen(self, session_id: str, *, max_active: int | None = None) -> None:
        session = self._live(session_id)
        if session.ended and max_active is not None and self._active(session.owner) >= max_active:
            raise TooManySessions(max_active)
        session.ended = False
        session.refresh()

    async def count_active(self, owner: str) -> int:
        return self._active(owner)

    async def touch(self, session_id: str) -> None:
        self._live(session_id).refresh()

    async def ping(self) -> float:
        return 0.0

    async def close(self) -> None:
        self._sessions.clear()
