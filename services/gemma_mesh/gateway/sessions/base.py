"""The session store's contract: records, errors, limits and the in-memory session both stores share."""

from __future__ import annotations

import bisect
import json
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gemma_mesh.common.errors import Overloaded, RateLimited

DEFAULT_MAX_EVENTS = 10_000
"""Events kept per session (the oldest are dropped beyond this)."""
DEFAULT_TTL_S = 3600.0
"""Seconds a session lives after its last write or touch."""
DEFAULT_MAX_BUFFERED_EVENTS = 10_000
"""Events per session held in memory while Redis is unreachable before writes fail."""
DEFAULT_EVENTS_AFTER_LIMIT = 1000
"""Events returned by one ``events_after`` call when the caller gives no limit."""

Observe = Callable[[str, float, bool], None]
"""``observe(op, seconds, ok)``: called once per Redis operation (the gateway feeds Prometheus)."""


class StoreUnavailable(Overloaded):
    """The session store cannot take or serve this right now (Redis unreachable and the data is not
    held in memory, or a session's write-behind buffer is full). Retry later."""


class TooManySessions(RateLimited):
    """``create`` or ``reopen`` with ``max_active``: the owner already has that many active sessions."""

    def __init__(self, max_active: int) -> None:
        super().__init__(f"{max_active} sessions already open for this key (max_sessions_per_key)")


@dataclass(frozen=True)
class SessionRecord:
    """A snapshot of one session (copies: changing it changes nothing in the store).

    Attributes:
        session_id: url-safe random id made by the store.
        owner: the API key id that created the session (never the key itself).
        config: the session's configuration (JSON object).
        state: the session's resumable state (JSON object; audio clock, open segment, ...).
        created_at: creation time, Unix seconds.
        ttl_s: seconds the session lives after its last write or touch.
        ended: ``end()`` was called; the events stay readable until the TTL runs out.
        last_event_id: the highest event id assigned so far (0: none).
    """

    session_id: str
    owner: str
    config: dict[str, Any]
    state: dict[str, Any]
    created_at: float
    ttl_s: float
    ended: bool = False
    last_event_id: int = 0


def new_session_id() -> str:
    """128 random bits, url-safe base64 (22 characters)."""
    return secrets.token_urlsafe(16)


def json_copy(value: dict[str, Any], what: str) -> dict[str, Any]:
    """A deep copy of a JSON object, through JSON, so both stores accept and return the same things.

    Raises:
        TypeError: ``value`` is not a dict or holds something JSON cannot encode.
    """
    if not isinstance(value, dict):
        raise TypeError(f"the session {what} must be a dict, got {type(value).__name__}")
    return json.loads(dumps(value))


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_event(event: dict[str, Any]) -> str:
    """The stored form of an event: compact JSON without ``event_id`` (the id is the log position)."""
    if not isinstance(event, dict):
        raise TypeError(f"a session event must be a dict, got {type(event).__name__}")
    return dumps({k: v for k, v in event.items() if k != "event_id"})


def decode_event(event_id: int, payload: str) -> dict[str, Any]:
    event = json.loads(payload)
    event["event_id"] = event_id
    return event


@dataclass(eq=False)
class LocalSession:
    """One session held in process memory: the whole session for ``MemorySessionStore``, this
    replica's copy (and write-behind buffer) for ``RedisSessionStore``.

    ``events`` holds ``(event_id, payload)`` in ascending id order; ``expires_at`` is on the
    ``time.monotonic()`` clock.
    """

    session_id: str
    owner: str
    config: dict[str, Any]
    state: dict[str, Any]
    created_at: float
    ttl_s: float
    ended: bool = False
    last_event_id: int = 0
    events: list[tuple[int, str]] = field(default_factory=list)
    expires_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.expires_at:
            self.refresh()

    def refresh(self, ttl_s: float | None = None) -> None:
        """Push the expiry to now + ``ttl_s`` (default: the session's TTL)."""
        self.expires_at = time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s)

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def record(self) -> SessionRecord:
        return SessionRecord(
            session_id=self.session_id,
            owner=self.owner,
            config=json.loads(dumps(self.config)),
            state=json.loads(dumps(self.state)),
            created_at=self.created_at,
            ttl_s=self.ttl_s,
            ended=self.ended,
            last_event_id=self.last_event_id,
        )

    def add_event(self, event_id: int, payload: str) -> None:
        """Insert in id order (ids from concurrent writers can arrive out of order)."""
        self.last_event_id = max(self.last_event_id, event_id)
        if not self.events or self.events[-1][0] < event_id:
            self.events.append((event_id, payload))
        else:
            bisect.insort(self.events, (event_id, payload))

    def index_after(self, event_id: int) -> int:
        """Position of the first held event with an id above ``event_id``."""
        return bisect.bisect_right(self.events, event_id, key=lambda item: item[0])

    def events_after(self, last_event_id: int, limit: int) -> list[dict[str, Any]]:
        start = self.index_after(last_event_id)
        return [decode_event(i, p) for i, p in self.events[start : start + max(0, limit)]]


class SessionStore(ABC):
    """Where the gateway keeps live sessions: meta, config, state and a capped event log.

    Every method is a coroutine except ``healthy``. Session ids unknown to the store, or whose TTL
    ran out, raise ``NotFound`` (``get`` returns None instead). ``StoreUnavailable`` means retry later.
    """

    ttl_s: float
    max_events: int

    def _session_ttl(self, ttl_s: float | None) -> float:
        """``create``'s TTL: the given one or the store's default. Raises ValueError unless > 0."""
        ttl_s = self.ttl_s if ttl_s is None else ttl_s
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        return ttl_s

    @property
    def healthy(self) -> bool:
        """False while the backing store is unreachable (writes are then buffered in memory)."""
        return True

    @abstractmethod
    async def create(
        self, owner: str, config: dict[str, Any], ttl_s: float | None = None, *, max_active: int | None = None
    ) -> SessionRecord:
        """Start a session for ``owner`` (TTL default: the store's ``ttl_s``). Counts as active.

        With ``max_active``, admission is atomic: of any number of concurrent creates (on any
        replica sharing the store) at most ``max_active`` active sessions result.

        Raises:
            TooManySessions: ``owner`` already has ``max_active`` active sessions.
        """

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None:
        """The session, or None when it does not exist or expired. Does not refresh the TTL."""

    @abstractmethod
    async def update_config(self, session_id: str, config: dict[str, Any]) -> None:
        """Replace the session's config. Refreshes the TTL."""

    @abstractmethod
    async def save_state(self, session_id: str, state: dict[str, Any]) -> None:
        """Replace the session's state. Refreshes the TTL."""

    @abstractmethod
    async def append(self, session_id: str, event: dict[str, Any]) -> int:
        """Append ``event`` to the log; returns its id (1, 2, 3... per session) and writes it into
        ``event["event_id"]``. Beyond ``max_events`` the oldest events are dropped. Refreshes the TTL.
        Allowed after ``end()``.

        Raises:
            TypeError: the event is not a JSON-encodable dict.
        """

    @abstractmethod
    async def events_after(
        self, session_id: str, last_event_id: int, limit: int = DEFAULT_EVENTS_AFTER_LIMIT
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` events with ids above ``last_event_id``, oldest first. When the log was
        capped past ``last_event_id``, it starts at the oldest kept event (the caller sees the gap)."""

    @abstractmethod
    async def end(self, session_id: str) -> None:
        """Mark the session ended: it stops counting as active; its events stay until the TTL."""

    @abstractmethod
    async def reopen(self, session_id: str, *, max_active: int | None = None) -> None:
        """Undo ``end()`` (a client resumed the session): it counts as active again. Refreshes the TTL.

        Raises:
            TooManySessions: with ``max_active``, the owner already has that many other active
                sessions (admitted atomically, as ``create``).
        """

    @abstractmethod
    async def count_active(self, owner: str) -> int:
        """Sessions of ``owner`` neither ended nor expired (the per-key session limit)."""

    @abstractmethod
    async def touch(self, session_id: str) -> None:
        """Refresh the session's TTL (a live session calls it while idle)."""

    @abstractmethod
    async def ping(self) -> float:
        """Round-trip latency to the backing store, in seconds.

        Raises:
            StoreUnavailable: the backing store is unreachable.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and release connections (a last flush is attempted first)."""
