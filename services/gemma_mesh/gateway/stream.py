"""``WS /v1/stream``: the WebSocket adapter between a browser (or ``gemma-mesh stream``) and a live session.

One connection = one attachment to a session. The adapter authenticates, parses control and
media messages (``protocol``), feeds the caption and frame pipelines (``live``), appends every
event to the session store (which assigns the event id) and sends it through a bounded outbound
buffer. Bad input gets an ``error`` event and the session goes on; only authentication and
protocol-level failures close the socket. A reconnect with ``session_id`` and ``last_event_id``
replays exactly the missed events from the store, on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from gemma_mesh.common.errors import (
    InvalidRequest,
    MeshError,
    NotFound,
    Overloaded,
    PermissionDenied,
    SessionBusy,
)
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.audio_input import PcmInput
from gemma_mesh.gateway.drain import DRAIN_CLOSE_CODE
from gemma_mesh.gateway.live.captions import RATE_HZ, CaptionPipeline
from gemma_mesh.gateway.live.frames import FramePipeline, check_frame
from gemma_mesh.gateway.outbound import UNACKED_BYTES, Outbound
from gemma_mesh.gateway.prompts import normalize_language
from gemma_mesh.gateway.protocol import (
    CLIENT_MESSAGE,
    Error,
    MediaKind,
    SessionConfig,
    SessionEnd,
    SessionEnded,
    SessionStart,
    SessionStarted,
    SessionUpdate,
    unpack_media,
)
from gemma_mesh.gateway.protocol import Warning as WarningEvent
from gemma_mesh.gateway.sessions.base import SessionRecord

log = get_logger(__name__)

START_TIMEOUT_S = 10.0
REPLAY_PAGE = 500
SLOW_CLIENT_POLL_S = 0.05  # how often a backlogged sender looks whether the client took more


def validate_config(config: SessionConfig, settings) -> SessionConfig:
    """Check a session config against the gateway's limits; normalise language tags.

    Raises:
        InvalidRequest: translate without a target language, an unknown language, fps over ``max_fps``.
    """
    updates: dict = {}
    if config.task == "translate" and not config.target_language:
        raise InvalidRequest(
            "task 'translate' needs config.target_language (BCP-47)", param="target_language"
        )
    if config.target_language:
        updates["target_language"] = normalize_language(config.target_language, param="target_language")
    if config.source_language:
        updates["source_language"] = normalize_language(config.source_language, param="source_language")
    if config.video is not None and config.video.max_fps > settings.max_fps:
        raise InvalidRequest(
            f"video.max_fps {config.video.max_fps} exceeds the limit of {settings.max_fps} (max_fps)",
            param="video.max_fps",
        )
    return config.model_copy(update=updates)


class StreamConnection:
    """One WebSocket attached to one session. Created per connection by ``app.py``."""

    def __init__(self, websocket: WebSocket, app_state) -> None:
        self.ws = websocket
        self.state = app_state
        self.settings = app_state.settings
        self.store = app_state.store
        self.metrics = app_state.metrics
        self.session_id: str | None = None
        self.config: SessionConfig | None = None
        self.outbound = Outbound(
            self.settings.max_outbound_events,
            unacked_bytes=websocket.scope.get("extensions", {}).get(UNACKED_BYTES),
            stall_timeout_s=self.settings.slow_client_timeout_s,
        )
        self.captions: CaptionPipeline | None = None
        self.frames: FramePipeline | None = None
        self._next_analysis_id = 0  # analysis ids continue when the camera is turned off and on
        self.pcm: PcmInput | None = None
        self.connected = True
        self._emit_lock = asyncio.Lock()
        self._coalesce_warned = False
        self._started_at = time.monotonic()
        self.holder = uuid.uuid4().hex  # this connection's id in the session lease
        self._leased: str | None = None  # the session id whose lease this connection holds
        self._keeper: asyncio.Task | None = None
        self._counted = False  # in the active-sessions gauge
        self._close_code: int | None = None  # set when the session ends: a normal close after the drain
        self._let_go = asyncio.Event()  # taken over by a newer connection, or closed as too slow
        self._drain_requested = asyncio.Event()
        self.closed = asyncio.Event()  # set once ``run`` has returned (``gateway.drain``)

    # --- events out -------------------------------------------------------------------------
    async def emit(self, event) -> None:
        """Append ``event`` (a protocol model) to the session log and queue it for the client."""
        payload = event.model_dump(mode="json")
        async with self._emit_lock:
            if self.session_id is not None:
                await self.store.append(self.session_id, payload)
            if self.connected and self.outbound.put(payload) and not self._coalesce_warned:
                self._coalesce_warned = True
                self.metrics.warnings.labels("events_coalesced").inc()
                log.info("slow client: coalescing partial events", session_id=self.session_id)

    async def send_error(self, error: MeshError, *, fatal: bool = False) -> None:
        """An ``error`` event (logged to the session when there is one)."""
        self.metrics.errors.labels(error.code).inc()
        await self.emit(Error(code=error.code, message=error.message, param=error.param, fatal=fatal))

    async def _sender(self) -> None:
        """Write queued events while the client takes them; close 1013 when it is too slow."""
        out = self.outbound
        while True:
            if out.stalled():  # also true once put() found the backlog full of finals
                self.connected = False
                self._let_go.set()
                self.metrics.warnings.labels("slow_client_closed").inc()
                log.info("slow client closed", session_id=self.session_id, reason=out.close_reason)
                await self.ws.close(code=1013, reason=out.close_reason)
                return
            if out.queue and out.can_send():
                text = json.dumps(out.queue.popleft())
                await self.ws.send_text(text)
                out.sent(text)
                continue
            out.ready.clear()
            if out.queue or out.in_flight():  # waiting for the client to take what it was sent
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(out.ready.wait(), SLOW_CLIENT_POLL_S)
            else:
                await out.ready.wait()

    # --- the connection -------------------------------------------------------------------
    def request_drain(self) -> None:
        """Shutdown: stop reading, finish the pipelines (finals delivered), then close with 1012."""
        self._drain_requested.set()

    async def run(self) -> None:
        """Serve the connection until the client leaves, the session ends or the gateway drains."""
        self.state.live.add(self)
        try:
            await self._run()
        finally:
            self.state.live.discard(self)
            self.closed.set()

    async def _run(self) -> None:
        sender: asyncio.Task | None = None
        try:
            owner, start = await self._handshake()
            if start is None:
                return
            sender = asyncio.create_task(self._sender())
            if await self._open(owner, start):
                await self._receive_loop()
        except WebSocketDisconnect:
            pass
        except Exception as exc:  # a MeshError is the caller's; anything else is ours, reported the same way
            error = exc if isinstance(exc, MeshError) else MeshError(f"internal error: {type(exc).__name__}")
            if not isinstance(exc, MeshError):
                log.exception("session failed", session_id=self.session_id)
            self.metrics.errors.labels(error.code).inc()
            with contextlib.suppress(Exception):
                await self.ws.send_text(
                    Error(
                        code=error.code, message=error.message, param=error.param, fatal=True
                    ).model_dump_json()
                )
                await self.ws.close(code=error.ws_close_code, reason=error.message[:120])
        finally:
            self.connected = False
            await self._detach()
            if sender is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._drain(), timeout=2.0)
                sender.cancel()
            if self._close_code is not None:
                with contextlib.suppress(Exception):
                    await self.ws.close(code=self._close_code)

    async def _drain(self) -> None:
        while self.outbound.queue and not self.outbound.overflowed:
            text = json.dumps(self.outbound.queue.popleft())
            await self.ws.send_text(text)
            self.outbound.sent(text)

    async def _handshake(self) -> tuple[str, SessionStart | None]:
        auth = self.state.auth
        try:
            auth.check_origin(self.ws.headers.get("origin"), self.ws.headers.get("host"))
        except MeshError as error:
            # Refused before the handshake completes: the browser sees HTTP 403.
            self.metrics.errors.labels(error.code).inc()
            log.info("websocket refused", reason=error.message)
            await self.ws.close(code=error.ws_close_code)
            return "", None
        await self.ws.accept()
        try:
            raw = await asyncio.wait_for(self.ws.receive(), timeout=START_TIMEOUT_S)
        except TimeoutError:
            raise InvalidRequest(f"no session.start within {START_TIMEOUT_S:.0f} s") from None
        if raw.get("type") == "websocket.disconnect":
            return "", None
        text = raw.get("text")
        if text is None:
            raise InvalidRequest("the first message must be a session.start JSON text message")
        message = self._parse(text)
        if not isinstance(message, SessionStart):
            raise InvalidRequest(f"the first message must be session.start, got {message.type}")
        header = self.ws.headers.get("authorization")
        owner = auth.check_key(header) if header and not message.token else auth.check_token(message.token)
        return owner, message

    def _parse(self, text: str):
        if len(text.encode()) > self.settings.max_control_bytes:
            raise InvalidRequest(
                f"control message of {len(text.encode())} bytes exceeds the limit of "
                f"{self.settings.max_control_bytes} bytes (max_control_bytes)"
            )
        try:
            return CLIENT_MESSAGE.validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidRequest(
                f"bad control message: {where + ': ' if where else ''}"
                f"{str(first.get('msg', '')).removeprefix('Value error, ')}",
                param=where or None,
            ) from None

    async def _open(self, owner: str, start: SessionStart) -> bool:
        """Create or resume the session -> True when it is live (False: an ended session's replay)."""
        settings = self.settings
        state: dict = {}
        if start.session_id:
            # Checked before the lease is taken (a resume that is refused must not touch a session
            # another connection holds), and again after: the previous connection may have logged
            # more events while it let go. A client cannot have seen an event the store lacks.
            self._check_resume(await self.store.get(start.session_id), start, owner)
            await self._claim(start.session_id)
            record = self._check_resume(await self.store.get(start.session_id), start, owner)
            config = SessionConfig.model_validate(record.config)
            state = dict(record.state)
            self.session_id = record.session_id
            ended = state.get("ended")
            if not ended:
                # Detached sessions do not count (the previous connection, if any, let go above):
                # resuming one opens it again, within the key's limit like a new one.
                await self.store.reopen(self.session_id, max_active=settings.max_sessions_per_key)
            # Replay exactly what the client missed, oldest first, before anything new. The stored
            # config applies (a resume's config is ignored; change it with session.update).
            last = start.last_event_id
            while True:
                page = await self.store.events_after(self.session_id, last, REPLAY_PAGE)
                if not page:
                    break
                for event in page:
                    self.outbound.queue.append(event)
                last = page[-1]["event_id"]
                self.outbound.ready.set()
                await asyncio.sleep(0)
            if ended:  # the session ended for good: the replay (ending in session.ended) is all
                log.info("ended session replayed", session_id=self.session_id, reason=ended)
                self._close_code = 1000
                return False
        else:
            config = validate_config(start.config, settings)
            await self._check_video_budget(config)
            # Admission is the store's one atomic step (a burst of opens on any replicas cannot
            # pass the per-key limit together); TooManySessions is a RateLimited (1013).
            record = await self.store.create(
                owner,
                config.model_dump(mode="json"),
                settings.session_ttl_s,
                max_active=settings.max_sessions_per_key,
            )
            self.session_id = record.session_id
            await self._claim(record.session_id)
        self.config = config
        self.metrics.active_sessions.inc()
        self._counted = True
        base_ms = int(state.get("audio_clock_ms", 0))
        if config.audio is not None:
            self.pcm = PcmInput(config.audio, RATE_HZ, settings.max_audio_chunk_ms)
            self.captions = CaptionPipeline(
                clients=self.state.clients,
                config=config,
                emit=self.emit,
                metrics=self.metrics,
                vad_settings=self.state.vad_settings,
                partial_interval_ms=settings.partial_interval_ms,
                max_tokens=settings.max_caption_tokens,
                max_pending_audio_s=settings.max_pending_audio_s,
                tokens_per_audio_s=settings.caption_tokens_per_audio_s,
                base_ms=base_ms,
                first_segment_id=int(state.get("next_segment_id", 0)),
                on_final=self._save_state,
                vad_batcher=self.state.vad_batcher,
                latency_monitor=self.state.caption_latency,
            )
            self.captions.start()
        self._next_analysis_id = int(state.get("next_analysis_id", 0))
        if config.video is not None:
            self._start_frames(config, self._next_analysis_id)
        await self.emit(
            SessionStarted(
                session_id=self.session_id,
                resumed=bool(start.session_id),
                config=config,
                audio_clock_ms=base_ms,
                limits={
                    "max_message_bytes": settings.max_message_bytes,
                    "max_control_bytes": settings.max_control_bytes,
                    "max_audio_chunk_ms": settings.max_audio_chunk_ms,
                    "max_frame_bytes": settings.max_frame_bytes,
                    "max_frame_pixels": settings.max_frame_pixels,
                    "max_fps": settings.max_fps,
                    "max_session_s": settings.max_session_s,
                },
            )
        )
        log.info("session attached", session_id=self.session_id, owner=owner, resumed=bool(start.session_id))
        return True

    @staticmethod
    def _check_resume(record: SessionRecord | None, start: SessionStart, owner: str) -> SessionRecord:
        """The session a ``session.start`` resumes, if this key may resume it from ``last_event_id``.

        Raises:
            NotFound: no such session (or it expired).
            PermissionDenied: it belongs to another API key.
            InvalidRequest: ``last_event_id`` is past the session's last event.
        """
        if record is None:
            raise NotFound(f"session {start.session_id} does not exist or expired", param="session_id")
        if record.owner != owner:
            raise PermissionDenied("this session belongs to another API key", param="session_id")
        if start.last_event_id > record.last_event_id:
            raise InvalidRequest(
                f"last_event_id {start.last_event_id} is ahead of the session's last event "
                f"{record.last_event_id}",
                param="last_event_id",
            )
        return record

    async def _claim(self, session_id: str) -> None:
        """Take the session's lease; a previous connection still attached is asked to let go first
        (it finishes decoding what it received, so this one reads the final state and full log).

        Raises:
            SessionBusy: the other connection did not let go within ``resume_wait_s``.
        """
        leases = self.state.leases
        deadline = time.monotonic() + self.settings.resume_wait_s
        while (holder := await leases.claim(session_id, self.holder)) is not None:
            if time.monotonic() > deadline:
                raise SessionBusy(
                    f"session {session_id} is still attached to another connection (resume_wait_s)",
                    param="session_id",
                )
            log.debug("waiting for the session's previous connection", session_id=session_id, holder=holder)
            await asyncio.sleep(0.1)
        self._leased = session_id
        self._keeper = asyncio.create_task(self._keep_lease(session_id))

    async def _keep_lease(self, session_id: str) -> None:
        """Refresh the lease; when another connection takes the session over, close this one."""
        leases = self.state.leases
        while True:
            await asyncio.sleep(leases.refresh_s)
            if not await leases.keep(session_id, self.holder):
                log.info("session taken over by a newer connection", session_id=session_id)
                self.connected = False
                self._let_go.set()
                with contextlib.suppress(Exception):
                    await self.ws.close(code=4001, reason="session resumed on another connection")
                return

    def _start_frames(self, config: SessionConfig, first_id: int) -> None:
        assert config.video is not None
        self.frames = FramePipeline(
            clients=self.state.clients,
            video=config.video,
            emit=self.emit,
            metrics=self.metrics,
            default_interval_ms=self.settings.analysis_interval_ms,
            max_tokens=self.settings.max_analysis_tokens,
            first_analysis_id=first_id,
            # A camera-only session yields to the other sessions' captions too.
            captions_behind=self.captions.behind
            if self.captions is not None
            else self.state.caption_latency.over_target,
            slots=self.state.analysis_slots,
        )
        self.frames.start()

    async def _receive_loop(self) -> None:
        deadline = self._started_at + self.settings.max_session_s
        let_go = asyncio.ensure_future(self._let_go.wait())
        draining = asyncio.ensure_future(self._drain_requested.wait())
        receiving: asyncio.Future | None = None
        try:
            while True:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    await self._end("max_session_length")
                    return
                if receiving is None:
                    receiving = asyncio.ensure_future(self.ws.receive())
                await asyncio.wait(
                    {receiving, let_go, draining}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if self._let_go.is_set():
                    return  # taken over, or closed as too slow: detach (flush) and let go
                if self._drain_requested.is_set():  # shutdown: finals out while the client listens
                    await self._flush()
                    self.captions = self.frames = None  # flushed: ``_detach`` has nothing left to do
                    self._close_code = DRAIN_CLOSE_CODE
                    return
                if not receiving.done():
                    continue
                raw, receiving = receiving.result(), None
                if await self._handle(raw):
                    return
        finally:
            let_go.cancel()
            draining.cancel()
            if receiving is not None:
                receiving.cancel()

    async def _handle(self, raw: dict) -> bool:
        """Handle one received ASGI message; True when the connection is done."""
        if raw.get("type") == "websocket.disconnect":
            return True
        try:
            if raw.get("bytes") is not None:
                await self._on_binary(raw["bytes"])
            elif raw.get("text") is not None:
                message = self._parse(raw["text"])
                if isinstance(message, SessionEnd):
                    await self._end("client")
                    return True
                if isinstance(message, SessionUpdate):
                    await self._update(message)
                else:
                    raise InvalidRequest("session.start was already received on this connection")
        except MeshError as error:
            await self.send_error(error)
        return self.outbound.overflowed

    async def _on_binary(self, data: bytes) -> None:
        if len(data) > self.settings.max_message_bytes:
            raise InvalidRequest(
                f"binary message of {len(data)} bytes exceeds the limit of "
                f"{self.settings.max_message_bytes} bytes (max_message_bytes)"
            )
        kind, timestamp_ms, payload = unpack_media(data)
        if kind == MediaKind.AUDIO:
            if self.captions is None or self.pcm is None:
                raise InvalidRequest("audio received but the session has no audio config")
            try:
                await self.captions.push(self.pcm.decode(payload))
            except Overloaded as error:  # name the refused message, so the client can resend exactly it
                raise Overloaded(
                    f"{error.message} (audio message at {timestamp_ms} ms)", param="audio"
                ) from None
        else:
            if self.frames is None:
                raise InvalidRequest("frame received but the session has no video config")
            check_frame(
                payload, max_bytes=self.settings.max_frame_bytes, max_pixels=self.settings.max_frame_pixels
            )
            if not self.frames.push(payload, timestamp_ms) and self.frames.dropped == 1:
                await self.emit(
                    WarningEvent(
                        code="frames_dropped",
                        message=f"frames above max_fps {self.frames.video.max_fps} are dropped (counted)",
                    )
                )

    async def _update(self, message: SessionUpdate) -> None:
        """Apply a ``session.update``: fields it sets replace the config's; ``video`` fields merge
        into the current video config (``"video": null`` turns the camera off: the waiting frame is
        analysed, later frames are refused). The merged config is validated like a start's.

        Raises:
            InvalidRequest: the merged config does not validate (the session keeps its old config).
        """
        assert self.config is not None and self.session_id is not None
        changes = message.config.model_dump(exclude_unset=True)
        merged = self.config.model_dump()
        if changes.get("video") is not None and merged.get("video") is not None:
            changes["video"] = {**merged["video"], **changes["video"]}
        merged.update(changes)
        try:
            config = SessionConfig.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidRequest(
                f"session.update: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}",
                param=".".join(str(p) for p in first["loc"]),
            ) from None
        config = validate_config(config, self.settings)
        await self._check_video_budget(config)
        self.config = config
        await self.store.update_config(self.session_id, config.model_dump(mode="json"))
        if self.captions is not None:
            self.captions.update_config(config)
        if self.frames is not None and config.video is None:
            frames, self.frames = self.frames, None
            await frames.finish()  # its last analysis first, so the ids stay unique and ordered
            self._next_analysis_id = frames.next_analysis_id
        elif self.frames is not None and config.video is not None:
            self.frames.video = config.video
        elif self.frames is None and config.video is not None:
            self._start_frames(config, self._next_analysis_id)

    async def _check_video_budget(self, config: SessionConfig) -> None:
        """Refuse a ``video.max_soft_tokens`` the vision encoder does not accept (asked once per
        gateway with ``Describe``); with the encoder unreachable the check is left to the frames.

        Raises:
            InvalidRequest: a budget outside the encoder's supported ones.
        """
        budget = config.video.max_soft_tokens if config.video is not None else None
        if budget is None:
            return
        try:
            supported = await self.state.clients.vision_budgets()
        except MeshError as error:
            log.warning("vision budgets unknown: frames will be checked one by one", error=error.message)
            return
        if budget not in supported:
            raise InvalidRequest(
                f"video.max_soft_tokens must be one of {list(supported)} or null (the model's per-frame "
                f"budget), got {budget}",
                param="video.max_soft_tokens",
            )

    async def _flush(self) -> None:
        """Finish the pipelines: the open segment gets its final, the waiting frame its analysis."""
        if self.captions is not None and self.pcm is not None:
            tail = self.pcm.flush()
            if tail.size:
                await self.captions.push(tail)
            await self.captions.finish()
        if self.frames is not None:
            await self.frames.finish()
        if self.session_id is not None:
            await self.store.save_state(self.session_id, self._state())

    async def _save_state(self) -> None:
        if self.session_id is not None:
            await self.store.save_state(self.session_id, self._state())

    def _state(self) -> dict:
        state: dict = {}
        if self.captions is not None:
            state["audio_clock_ms"] = self.captions.durable_ms
            state["next_segment_id"] = self.captions.next_segment_id
        state["next_analysis_id"] = (
            self.frames.next_analysis_id if self.frames is not None else self._next_analysis_id
        )
        return state

    async def _end(self, reason: str) -> None:
        await self._flush()
        clock = self.captions.durable_ms if self.captions is not None else 0
        await self.emit(SessionEnded(reason=reason, audio_clock_ms=clock))
        # Ended for good: a later resume only replays what the client missed (see ``_open``).
        await self.store.save_state(self.session_id, {**self._state(), "ended": reason})
        await self.store.end(self.session_id)
        self._close_code = 1000
        self.captions = None
        self.frames = None

    async def _detach(self) -> None:
        """The connection is gone: finish what was received (finals are logged for resume), then release."""
        try:
            if self.session_id is not None:
                if self.captions is not None or self.frames is not None:
                    await self._flush()
                # Every session stops counting against max_sessions_per_key, media or not.
                await self.store.end(self.session_id)
        except MeshError as error:
            log.warning("session detach failed", session_id=self.session_id, error=error.message)
        finally:
            if self._counted:
                self.metrics.active_sessions.dec()
            if self._leased is not None:  # also when the session start failed after the claim
                if self._keeper is not None:
                    self._keeper.cancel()
                await self.state.leases.release(self._leased, self.holder)
            if self.session_id is not None:
                log.info("session detached", session_id=self.session_id)
