"""The gateway's ASGI app (FastAPI): wiring of the WebSocket stream, the OpenAI API, the page and health.

``create_app(settings)`` builds everything a replica needs (gRPC clients, session store,
authenticator, metrics) in the app's lifespan and keeps it on ``app.state.gw`` (``GatewayState``).
Errors raised as ``MeshError`` anywhere under ``/v1`` become OpenAI-shaped JSON bodies with the
error's HTTP status (``error_response``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gemma_mesh.common.errors import MeshError
from gemma_mesh.common.grpc_server import KeepaliveSettings, start_metrics_server
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.auth import Authenticator
from gemma_mesh.gateway.captioning import VadSettings
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.live.latency import CaptionLatencyMonitor
from gemma_mesh.gateway.live.vad_batcher import VadBatcher
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.readiness import check_dependencies
from gemma_mesh.gateway.sessions import SessionStore, open_store
from gemma_mesh.gateway.sessions.lease import open_leases
from gemma_mesh.gateway.settings import GatewaySettings
from gemma_mesh.gateway.state import GatewayState
from gemma_mesh.gateway.stream import StreamConnection
from gemma_mesh.gateway.token_secret import shared_token_secret

log = get_logger(__name__)
STATIC_DIR = Path(__file__).parent / "static"


async def _check_store(store: SessionStore) -> None:
    """Fail at start on a Redis that answers with an error (a wrong database, a wrong password);
    an unreachable one is only a warning (the gateway starts, not ready, and retries)."""
    from gemma_mesh.gateway.sessions import StoreUnavailable

    try:
        await store.ping()
    except StoreUnavailable as error:
        log.warning("session store unreachable at start; /readyz reports it", error=error.message)
    except Exception as error:
        raise RuntimeError(f"session store refused the connection: {error}") from error


def error_body(error: MeshError) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": error.message, "type": error.code, "param": error.param, "code": error.code}}


def error_response(error: MeshError) -> JSONResponse:
    """The HTTP response of ``error`` (status from the error class)."""
    return JSONResponse(error_body(error), status_code=error.http_status)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app. Backends are reached lazily: the app starts even when they are down
    (``/readyz`` says so)."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = GatewayMetrics()
        store = open_store(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            max_events=settings.event_log_max_events,
            ttl_s=settings.session_ttl_s,
            observe=metrics.observe_store,
        )
        clients = MeshClient(
            settings.decoder_target,
            settings.audio_target,
            settings.vision_target,
            max_message_bytes=settings.max_grpc_message_bytes,
            timeout_s=settings.backend_timeout_s,
            keepalive=KeepaliveSettings(
                settings.grpc_keepalive_time_s,
                settings.grpc_keepalive_timeout_s,
                settings.grpc_retry_attempts,
            ),
        )
        if settings.redis_url:
            await _check_store(store)
            metrics.redis_up.set(1 if store.healthy else 0)
        else:  # no Redis to be up or down: the alert must not see a 0
            metrics.registry.unregister(metrics.redis_up)
        vad_settings = VadSettings(model_path=settings.vad_model_path)
        from gemma_mesh.gateway.captioning import find_silero_model

        find_silero_model(vad_settings.model_path)  # fail at start, not at the first session
        leases = open_leases(settings.redis_url, settings.session_lease_s, prefix=settings.redis_key_prefix)
        shared_secret = None
        if settings.token_secret is None and settings.redis_url:
            shared_secret = await shared_token_secret(settings.redis_url, settings.redis_key_prefix)
        vad_batcher = VadBatcher(vad_settings.model_path)
        app.state.gw = GatewayState(
            settings,
            clients,
            store,
            metrics,
            Authenticator(settings, shared_secret),
            vad_settings,
            leases,
            vad_batcher,
            CaptionLatencyMonitor(settings.caption_latency_target_ms / 1000),
            asyncio.Semaphore(settings.max_concurrent_analyses),
        )
        log.info(
            "gateway ready",
            decoder=settings.decoder_target,
            audio=settings.audio_target,
            vision=settings.vision_target,
            store="redis" if settings.redis_url else "memory",
            auth=bool(settings.api_keys),
        )
        metrics_http, metrics_port = start_metrics_server(
            settings.metrics_port, settings.host, metrics.registry
        )
        if metrics_port is not None:
            log.info("metrics on their own port", metrics_port=metrics_port)
        try:
            yield
        finally:
            if metrics_http is not None:
                metrics_http.shutdown()
            await clients.close()
            await store.close()
            await leases.close()
            vad_batcher.close()

    app = FastAPI(
        title="gemma-mesh gateway",
        version="0.1.0",
        description="Live captioning, translation and frame analysis over WebSocket; OpenAI-compatible API.",
        lifespan=lifespan,
    )

    @app.exception_handler(MeshError)
    async def _mesh_error(request: Request, error: MeshError) -> JSONResponse:
        request.app.state.gw.metrics.errors.labels(error.code).inc()
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
        param = ".".join(loc) or None
        wrapped = MeshError(f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)
        wrapped.code = "invalid_request_error"
        request.app.state.gw.metrics.errors.labels(wrapped.code).inc()
        return JSONResponse(error_body(wrapped), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, error: ClientDisconnect) -> Response:
        """The client left while its body was still arriving: nginx's 499, nothing to answer."""
        from gemma_mesh.gateway.openai.router import CLIENT_CLOSED_REQUEST

        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        wrapped = MeshError(str(error.detail))
        wrapped.code = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(wrapped), status_code=error.status_code)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 while the gateway can serve some capability (the decoder is SERVING) and is
        not draining; the body lists the capabilities lost to a backend or the session store
        (``gateway.readiness``).
        Every check runs at once, each cut off after ``readiness_check_timeout_s``."""
        gw: GatewayState = request.app.state.gw
        if gw.live.draining:  # shutting down: no new sessions here
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        timeout_s = gw.settings.readiness_check_timeout_s
        checks = {name: gw.clients.serving(name, timeout_s) for name in ("decoder", "audio", "vision")}
        readiness = await check_dependencies(checks, gw.store.ping(), timeout_s)
        for name, ok in readiness.capabilities.items():
            gw.metrics.capability_up.labels(name).set(1 if ok else 0)
        return JSONResponse(readiness.body(), status_code=200 if readiness.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics, unless ``metrics_port`` serves them on a port of their own (404)."""
        if settings.metrics_port is not None:
            raise StarletteHTTPException(404, f"/metrics is served on port {settings.metrics_port}")
        return Response(
            generate_latest(request.app.state.gw.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.post("/v1/stream/token")
    async def stream_token(request: Request) -> dict:
        """Mint a short-lived session token for a browser's ``session.start`` (Bearer key required
        when authentication is on)."""
        gw: GatewayState = request.app.state.gw
        gw.auth.check_origin(request.headers.get("origin"), request.headers.get("host"))
        kid = gw.auth.check_key(request.headers.get("authorization"))
        token, expires = gw.auth.mint_token(kid)
        return {"token": token, "expires_at": expires, "ttl_s": gw.auth.token_ttl_s}

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        await StreamConnection(websocket, websocket.app.state.gw).run()

    from gemma_mesh.gateway.openai.router import router as openai_router

    app.include_router(openai_router)
    from gemma_mesh.gateway.realtime.router import router as realtime_router

    app.include_router(realtime_router)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.monotonic()

        def count(status: int) -> str:
            path = getattr(request.scope.get("route"), "path", "unmatched")
            if path.startswith("/v1/"):
                request.app.state.gw.metrics.http_requests.labels(path, str(status)).inc()
            return path

        try:
            response = await call_next(request)
        except Exception:  # a bug of ours: Starlette answers 500; count it before it propagates
            count(500)
            raise
        path = count(response.status_code)
        log.debug(
            "http", path=path, status=response.status_code, ms=round((time.monotonic() - started) * 1000)
        )
        return response

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
