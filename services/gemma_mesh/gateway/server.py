"""Run the gateway (``gemma-mesh serve gateway``): uvicorn with the WebSocket size limit from settings."""

from __future__ import annotations

import uvicorn

from gemma_mesh.common.logging import configure_logging
from gemma_mesh.gateway.app import create_app
from gemma_mesh.gateway.settings import GatewaySettings


def run_gateway_server(settings: GatewaySettings) -> None:
    """Serve HTTP and WebSocket on ``settings.host:settings.port`` until SIGTERM/SIGINT.

    uvicorn's own WebSocket frame limit is set above ``max_message_bytes`` so an oversized message
    reaches the adapter and gets an ``error`` event instead of a closed socket.
    """
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=4 * settings.max_message_bytes,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
