"""What both Realtime API WebSockets share: authentication on the upgrade, the session's place in
the session store and per-key limits, the receive loop, error events and a bounded sender.

Authentication is OpenAI's: ``Authorization: Bearer <key>`` on the upgrade request, where the key
is an API key or a short-lived secret from ``POST /v1/realtime/client_secrets`` (the gateway's
session token); a browser offers it as the subprotocol ``openai-insecure-api-key.<secret>`` (with
``realtime``, which the gateway then selects), as OpenAI's browser clients do. A refused upgrade is closed before it is accepted (the client sees HTTP 403).
Every session is a record in the session store (Redis or in-process), so it counts against
``max_sessions_per_key`` like a ``/v1/stream`` session; the Realtime API has no resume, so its
events are not logged for replay. Bad input gets an OpenAI ``error`` event and the session goes on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import time
from collections import deque

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import TypeAdapter

from gemma_mesh.common.errors import InvalidRequest, MeshError, RateLimited
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.realtime.protocol import error_event, parse_client_event

log = get_logger(__name__)
# Browsers cannot set headers on a WebSocket: OpenAI's browser clients offer the subprotocols
# ``realtime`` and ``openai-insecure-api-key.<key>`` instead (meant for client secrets).
KEY_SUBPROTOCOL = "openai-insecure-api-key."


def bearer_owner(auth, authorization: str | None) -> str:
    """The key id behind an ``Authorization: Bearer`` value: an API key, or a client secret (a
    session token, ``v1.<key id>.<expiry>.<signature>``) minted for one.

    Raises:
        Unauthenticated: missing, unknown, forged or expired.
    """
    presented = (
        authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
    )
    if presented.startswith("v1.") and presented.count(".") == 3:
        return auth.check_token(presented)
    return auth.check_key(authorization)


class RealtimeConnection(abc.ABC):
    """One Realtime WebSocket; subclasses implement ``open`` (after the session exists), ``handle``
    (one parsed client event) and ``finish`` (flush and release the pipelines)."""

    client_events: TypeAdapter
    event_types: tuple[str, ...]
    kind: str  # "transcription" or "translation": the store record's config

    def __init__(self, websocket: WebSocket, app_state) -> None:
        self.ws = websocket
        self.state = app_state
        self.settings = app_state.settings
        self.metrics = app_state.metrics
        self.session_id: str | None = None
        self.owner = ""
        self._queue: deque[dict] = deque()
        self._ready = asyncio.Event()
        self._overflowed = False
        self._closing = False
        self._counted = False

    # --- events out ---------------------------------------------------------------------------
    async def send(self, *events: dict) -> None:
        """Queue server events. More than ``max_outbound_events`` waiting (a client that does not
        read) closes the socket with 1013; Realtime deltas are append-only, so none can be coalesced."""
        for event in events:
            if len(self._queue) >= self.settings.max_outbound_events:
                self._overflowed = True
            self._queue.append(event)
        self._ready.set()

    async def send_error(self, error: MeshError, event_id: str | None = None) -> None:
        self.metrics.errors.labels(error.code).inc()
        await self.send(error_event(error, event_id))

    async def _sender(self) -> None:
        while True:
            await self._ready.wait()
            while self._queue:
                if self._overflowed:
                    await self.ws.close(code=1013, reason="client too slow: events not read")
                    return
                await self.ws.send_text(json.dumps(self._queue.popleft()))
            self._ready.clear()

    # --- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves, closes the session or its time is up."""
        auth = self.state.auth
        offered = [
            p.strip() for p in self.ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
        ]
        in_protocol = next(
            (p[len(KEY_SUBPROTOCOL) :] for p in offered if p.startswith(KEY_SUBPROTOCOL)), None
        )
        authorization = self.ws.headers.get("authorization") or (
            f"Bearer {in_protocol}" if in_protocol else None
        )
        try:
            auth.check_origin(self.ws.headers.get("origin"), self.ws.headers.get("host"))
            self.owner = bearer_owner(auth, authorization)
        except MeshError as error:
            self.metrics.errors.labels(error.code).inc()
            log.info("realtime upgrade refused", reason=error.message)
            await self.ws.close(code=error.ws_close_code)  # before accept: HTTP 403
            return
        await self.ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        sender = asyncio.create_task(self._sender())
        try:
            limit = self.settings.max_sessions_per_key
            if await self.state.store.count_active(self.owner) >= limit:
                raise RateLimited(f"{limit} sessions already open for this key (max_sessions_per_key)")
            record = await self.state.store.create(
                self.owner, {"realtime": self.kind}, self.settings.session_ttl_s
            )
            self.session_id = record.session_id
            self.metrics.active_sessions.inc()
            self._counted = True
            await self.open()
            log.info("realtime session opened", session_id=self.session_id, kind=self.kind, owner=self.owner)
            await self._receive_loop()
        except WebSocketDisconnect:
            pass
        except MeshError as error:  # refused at the start (a limit): the error, then the close
            await self.send_error(error)
            self._closing = True
        except Exception:
            log.exception("realtime session failed", session_id=self.session_id)
            await self.send_error(MeshError("internal error"))
            self._closing = True
        finally:
            with contextlib.suppress(Exception):
                await self.finish()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain(), timeout=2.0)
            sender.cancel()
            if self._closing:
                with contextlib.suppress(Exception):
                    await self.ws.close(code=1000)
            if self.session_id is not None:
                with contextlib.suppress(MeshError):
                    await self.state.store.end(self.session_id)
            if self._counted:
                self.metrics.active_sessions.dec()
            log.info("realtime session closed", session_id=self.session_id)

    async def _drain(self) -> None:
        while self._queue and not self._overflowed:
            await self.ws.send_text(json.dumps(self._queue.popleft()))

    async def _receive_loop(self) -> None:
        deadline = time.monotonic() + self.settings.max_session_s
        while not self._closing and not self._overflowed:
            try:
                raw = await asyncio.wait_for(
                    self.ws.receive(), timeout=max(deadline - time.monotonic(), 0.01)
                )
            except TimeoutError:
                self._closing = True
                return
            if raw.get("type") == "websocket.disconnect":
                return
            event_id = None
            try:
                text = raw.get("text")
                if text is None:
                    raise InvalidRequest("binary messages are not part of the Realtime API: send JSON events")
                event = parse_client_event(
                    text, self.client_events, self.event_types, self.settings.max_message_bytes
                )
                event_id = getattr(event, "event_id", None)
                await self.handle(event)
            except MeshError as error:
                await self.send_error(error, event_id)

    @abc.abstractmethod
    async def open(self) -> None:
        """Send ``session.created`` (the session record exists)."""

    @abc.abstractmethod
    async def handle(self, event) -> None:
        """Apply one parsed client event; raise ``MeshError`` for an ``error`` event."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """The connection ends: finish what was received and release the pipelines."""
