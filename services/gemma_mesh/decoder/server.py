"""Build and run the decoder's gRPC server (``gemma-mesh serve decoder``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc

from gemma_mesh.common.grpc_server import (
    create_server,
    limit_blas_threads,
    mark_serving,
    serve,
    start_metrics_server,
)
from gemma_mesh.common.logging import configure_logging, get_logger
from gemma_mesh.decoder.engine import Engine
from gemma_mesh.decoder.metrics import DecoderMetrics
from gemma_mesh.decoder.servicer import DecoderServicer
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import decoder_pb2, decoder_pb2_grpc

log = get_logger("decoder.server")
SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name


@dataclass
class DecoderServer:
    """A started decoder: the gRPC server, its port, the engine and the metrics endpoint."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    health: Any
    metrics_server: Any
    metrics_port: int | None

    async def stop(self, grace_s: float = 0.0) -> None:
        await self.server.stop(grace_s)
        self.engine.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


async def start_decoder(settings: DecoderSettings, bundle: ModelBundle | None = None) -> DecoderServer:
    """Load the bundle, start the engine and the server; SERVING once the decoder session is loaded."""
    bundle = bundle or ModelBundle.from_settings(settings)
    metrics = DecoderMetrics()
    holder: dict[str, Engine] = {}

    def register(server: grpc.aio.Server) -> list[str]:
        engine = Engine(bundle, settings, metrics)
        holder["engine"] = engine
        decoder_pb2_grpc.add_DecoderServicer_to_server(DecoderServicer(engine, settings), server)
        return [SERVICE_NAME]

    server, port, health = create_server(settings, register)
    engine = holder["engine"]
    engine.start()
    await server.start()
    await mark_serving(health, [SERVICE_NAME])
    metrics_server, metrics_port = start_metrics_server(
        settings.metrics_port, settings.host, metrics.registry
    )
    log.info(
        "decoder serving",
        port=port,
        metrics_port=metrics_port,
        bundle=str(bundle.path),
        providers=bundle.providers,
        max_batch_size=settings.max_batch_size,
    )
    return DecoderServer(server, port, engine, health, metrics_server, metrics_port)


def run_decoder_server(settings: DecoderSettings) -> None:
    """Blocking entry point: serve until SIGTERM/SIGINT, then drain for ``shutdown_grace_s``."""
    configure_logging(settings.log_level)
    limit_blas_threads(settings.blas_threads)

    async def main() -> None:
        started = await start_decoder(settings)
        try:
            await serve(started.server, started.health, settings.shutdown_grace_s)
        finally:
            started.engine.stop()
            if started.metrics_server is not None:
                started.metrics_server.shutdown()

    asyncio.run(main())
