"""Run the gateway (``gemma-mesh serve gateway``): uvicorn with the WebSocket size limit from settings
and a shutdown that drains live sessions first (``DrainingServer``)."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.common.logging import configure_logging, get_logger
from gemma_mesh.common.net import check_port_free
from gemma_mesh.gateway.app import create_app
from gemma_mesh.gateway.captioning import find_silero_model
from gemma_mesh.gateway.settings import GatewaySettings

log = get_logger(__name__)
# Seconds HTTP requests (a chat completion streaming its answer) get after the sessions drained.
DRAIN_HTTP_MARGIN_S = 3.0


def check_redis(url: str | None, *, require_reachable: bool = False) -> None:
    """Refuse to start on a Redis that answers with an error (wrong database or password).

    An unreachable Redis is not an error for the gateway (a Kubernetes pod comes up not ready and
    retries, as it would after a Redis restart); ``gemma-mesh up`` asks for ``require_reachable``,
    where a Redis that is not running is the user's setup to fix, not a state to wait out.

    Raises:
        InvalidRequest: Redis refused the connection or the URL is unusable; with
            ``require_reachable``, also when nothing answers at the URL within 2 s.
    """
    if not url:
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as error:
        if require_reachable:
            raise InvalidRequest(
                f"redis at {url} is unreachable ({error}); start redis-server or leave out --redis-url"
            ) from None
        log.warning("redis unreachable at start; /readyz reports it until it answers", error=str(error))
    except (redis.RedisError, ValueError) as error:
        raise InvalidRequest(f"redis at {url} refused the connection: {error}") from None
    finally:
        client.close()


def uvicorn_options(settings: GatewaySettings) -> dict:
    """uvicorn settings that follow from ``settings``: the WebSocket frame limit (4x
    ``max_message_bytes``, so an oversized message reaches the adapter and gets an ``error`` event
    instead of a closed socket), permessage-deflate (``ws_compression``), the keepalive
    (``ws_ping_interval_s``, ``ws_ping_timeout_s``) and the protocol that lets the adapter see what
    a client has not taken (``ws_protocol``)."""
    from gemma_mesh.gateway.ws_protocol import BacklogWebSocketProtocol

    return {
        "ws": BacklogWebSocketProtocol,
        "ws_max_size": 4 * settings.max_message_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
    }


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first drains the live sessions (``gateway.drain``) for
    ``drain_grace_s``, then lets uvicorn close what is left and finish HTTP requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_grace_s = drain_grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # no new connections while the sessions drain
            server.close()
        gw = getattr(self.app.state, "gw", None)
        if gw is not None and not self.force_exit:
            await gw.live.drain(self.drain_grace_s)
        await super().shutdown(sockets)


def run_gateway_server(settings: GatewaySettings) -> None:
    """Serve HTTP and WebSocket on ``settings.host:settings.port`` until SIGTERM/SIGINT, then drain:
    live sessions get ``drain_grace_s`` to deliver their finals (then close 1012), HTTP requests in
    flight up to ``DRAIN_HTTP_MARGIN_S`` more.

    uvicorn's own WebSocket frame limit is set above ``max_message_bytes`` so an oversized message
    reaches the adapter and gets an ``error`` event instead of a closed socket.
    """
    configure_logging(settings.log_level)
    check_redis(settings.redis_url)
    find_silero_model(settings.vad_model_path)  # a missing VAD model is a one-line error, not a traceback
    check_port_free(settings.host, settings.port, what="the gateway")  # before uvicorn logs a bind error
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_grace_s + DRAIN_HTTP_MARGIN_S),
        **uvicorn_options(settings),
    )
    DrainingServer(config, app, settings.drain_grace_s).run()
