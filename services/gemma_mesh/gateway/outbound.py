"""Events on their way to one WebSocket client, measured by what the client has actually taken.

A client that stops reading does not stall the session: its events wait here, superseded partial
captions and streaming frame-analysis deltas are coalesced away (their successors carry the full
text), and when only events that must not be dropped remain, or the client took nothing for
``stall_timeout_s``, the connection is closed with 1013 and a reason; the client resumes from its
last event id (the session log has every event).

What the client has taken is counted in bytes: those written to the socket minus those its TCP
stack has not acknowledged yet (the server's unsent transport buffer plus the kernel's send queue,
``SIOCOUTQ``; see ``ws_protocol``). Without that probe (another ASGI server), only the events still
queued here count, and the kernel's buffers may absorb hundreds of events before coalescing
starts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

COALESCIBLE = ("caption.partial", "translation.partial", "frame.analysis")
UNACKED_BYTES = "gemma_mesh.unacked_bytes"
"""Key of the ASGI scope extension ``() -> int`` that ``ws_protocol`` provides."""


def frame_bytes(text: str) -> int:
    """Bytes of an unmasked server-to-client WebSocket text frame carrying ``text`` (RFC 6455 5.2)."""
    size = len(text.encode())
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


class Outbound:
    """Bounded backlog of one client's events (queued here + written but not taken).

    Args:
        max_events: backlog at which partials are coalesced; when coalescing frees nothing the
            client is too slow (``close_reason`` is set; the adapter closes with 1013).
        unacked_bytes: ``() -> int``, bytes written to the socket the client has not taken yet;
            None = unknown (only the queue counts).
        stall_timeout_s: the client is too slow when it took nothing for this long while events
            were outstanding (before the server's keepalive would cut it with 1006).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        max_events: int,
        *,
        unacked_bytes: Callable[[], int] | None = None,
        stall_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_events = max_events
        # Half the budget may sit in the socket; the rest waits here, where it can be coalesced.
        self.max_in_flight = max(1, max_events // 2)
        self.stall_timeout_s = stall_timeout_s
        self.queue: deque[dict] = deque()
        self.ready = asyncio.Event()
        self.coalesced = 0
        self.close_reason: str | None = None
        self._unacked = unacked_bytes
        self._clock = clock
        self._ends: deque[int] = deque()  # end offsets (bytes) of events written, not yet taken
        self._sent_bytes = 0
        self._taken_bytes = 0
        self._progress_at = clock()

    @property
    def overflowed(self) -> bool:
        return self.close_reason is not None

    def in_flight(self) -> int:
        """Events written to the socket that the client has not taken yet."""
        if self._unacked is None:
            return 0
        unacked = self._unacked()
        taken = self._sent_bytes - unacked
        if taken > self._taken_bytes or unacked == 0:
            self._taken_bytes = max(self._taken_bytes, taken)
            self._progress_at = self._clock()
        while self._ends and self._ends[0] <= self._taken_bytes:
            self._ends.popleft()
        return len(self._ends)

    def backlog(self) -> int:
        """Events the client has not taken: queued here plus in flight."""
        return len(self.queue) + self.in_flight()

    def put(self, event: dict) -> bool:
        """Queue ``event``; returns True when older events had to be coalesced."""
        coalesced = False
        backlog = self.backlog()
        if backlog >= self.max_events:
            keep: deque[dict] = deque()
            for old in self.queue:
                if old["type"] in COALESCIBLE and not old.get("done", False):
                    self.coalesced += 1
                    coalesced = True
                    continue
                keep.append(old)
            backlog -= len(self.queue) - len(keep)
            self.queue = keep
            if backlog >= self.max_events and self.close_reason is None:
                self.close_reason = (
                    f"client too slow: {backlog} events not taken (max_outbound_events); "
                    "resume from your last event id"
                )
        self.queue.append(event)
        self.ready.set()
        return coalesced

    def can_send(self) -> bool:
        """Whether the next queued event may be written now (the socket holds less than its share)."""
        return self.in_flight() < self.max_in_flight

    def sent(self, text: str) -> None:
        """Record an event written to the socket as ``text``."""
        self._sent_bytes += frame_bytes(text)
        if self._unacked is not None:
            self._ends.append(self._sent_bytes)

    def stalled(self) -> bool:
        """True (and ``close_reason`` set) when the client took nothing for ``stall_timeout_s``
        while events were outstanding."""
        if self.close_reason is None and self.in_flight() > 0:
            idle = self._clock() - self._progress_at
            if idle > self.stall_timeout_s:
                self.close_reason = (
                    f"client too slow: took no event for {idle:.0f} s (slow_client_timeout_s); "
                    "resume from your last event id"
                )
        return self.close_reason is not None
