"""Run the gateway (``gemma-mesh serve gateway``): uvicorn with the WebSocket size limit from settings."""

from __future__ import annotations

import uvicorn

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.common.logging import configure_logging, get_logger
from gemma_mesh.gateway.app import create_app
from gemma_mesh.gateway.settings import GatewaySettings

log = get_logger(__name__)


def check_redis(url: str | None) -> None:
    """Refuse to start on a Redis that answers with an error (wrong database or password).

    An unreachable Redis is not an error at start: the gateway comes up not ready and retries.

    Raises:
        InvalidRequest: Redis refused the connection or the URL is unusable.
    """
    if not url:
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as error:
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


def run_gateway_server(settings: GatewaySettings) -> None:
    """Serve HTTP and WebSocket on ``settings.host:settings.port`` until SIGTERM/SIGINT.

    uvicorn's own WebSocket frame limit is set above ``max_message_bytes`` so an oversized message
    reaches the adapter and gets an ``error`` event instead of a closed socket.
    """
    configure_logging(settings.log_level)
    check_redis(settings.redis_url)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        **uvicorn_options(settings),
    )
