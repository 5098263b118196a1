"""Graceful shutdown of a gateway's live WebSocket sessions (SIGTERM, a rolling update, a scale-down).

uvicorn's own shutdown closes every WebSocket with 1012 at once, before the open segments' finals
are decoded: the client would resume elsewhere and wait for audio it already sent to be captioned
again. ``LiveConnections.drain(grace_s)`` runs first (``gateway.server.DrainingServer``): every live
connection stops reading, finishes its pipelines (the open segment gets its final, the waiting frame
its analysis), delivers those events, and only then closes with 1012 (service restart: resume on
another replica from the last event id). Connections that arrive while draining are drained at once.
``grace_s`` bounds the whole drain; what is left is closed by uvicorn.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from gemma_mesh.common.logging import get_logger

log = get_logger(__name__)

# WebSocket close code of a connection drained at shutdown (RFC 6455 "Service Restart").
DRAIN_CLOSE_CODE = 1012


class Drainable(Protocol):
    closed: asyncio.Event

    def request_drain(self) -> None:
        """Stop reading, deliver what is in flight, close with ``DRAIN_CLOSE_CODE``."""


class LiveConnections:
    """The live connections of one gateway process, and whether it is draining."""

    def __init__(self) -> None:
        self._live: set[Drainable] = set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._live)

    def add(self, connection: Drainable) -> None:
        self._live.add(connection)
        if self.draining:
            connection.request_drain()

    def discard(self, connection: Drainable) -> None:
        self._live.discard(connection)

    async def drain(self, grace_s: float) -> int:
        """Drain every live connection; wait at most ``grace_s``. Returns how many were still open."""
        self.draining = True
        live = list(self._live)
        started = time.monotonic()
        log.info("draining sessions", sessions=len(live), grace_s=grace_s)
        for connection in live:
            connection.request_drain()
        waits = [asyncio.ensure_future(connection.closed.wait()) for connection in live]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace_s)
            for wait in pending:
                wait.cancel()
        left = len(self._live)
        log.info("sessions drained", left=left, seconds=round(time.monotonic() - started, 3))
        return left
