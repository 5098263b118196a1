"""Run the gateway (``gemma-mesh serve gateway``): uvicorn with the WebSocket size limit from settings."""

from __future__ import annotations

import uvicorn

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.common.logging import configure_logging, get_logger
from gemma_mesh.gateway.app import create_app
from gemma_mesh.gateway.captioning import find_silero_model
from gemma_mesh.gateway.settings import GatewaySettings

log = get_logger(__name__)


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
    instead of a closed socket) and permessage-deflate (``ws_compression``)."""
    return {
        "ws_max_size": 4 * settings.max_message_bytes,
        "ws_per_message_deflate": settings.ws_compression,
    }


def run_gateway_server(settings: GatewaySettings) -> None:
    """Serve HTTP and WebSocket on ``settings.host:settings.port`` until SIGTERM/SIGINT.

    uvicorn's own WebSocket frame limit is set above ``max_message_bytes`` so an oversized message
    reaches the adapter and gets an ``error`` event instead of a closed socket.
    """
    configure_logging(settings.log_level)
    check_redis(settings.redis_url)
    find_silero_model(settings.vad_model_path)  # a missing VAD model is a one-line error, not a traceback
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        **uvicorn_options(settings),
    )
