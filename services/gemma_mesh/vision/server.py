"""Build, start and run the vision encoder's gRPC server (``gemma-mesh serve vision``).

``VisionServer(settings)`` binds the port with health (not ready) and reflection; ``start(bundle)``
starts serving, loads the bundle and warms the encoder off the event loop (calls meanwhile get
UNAVAILABLE), starts the batcher, then reports SERVING; ``stop(grace_s)`` drains. Tests run it
in-process on port 0.
"""

from __future__ import annotations

import asyncio

import grpc

from gemma_mesh.common.grpc_server import create_server, mark_serving, serve, start_metrics_server
from gemma_mesh.common.logging import configure_logging, get_logger
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import vision_pb2_grpc
from gemma_mesh.vision.servicer import SERVICE_NAME, VisionEncoderServicer
from gemma_mesh.vision.serving import VisionEngine
from gemma_mesh.vision.settings import VisionSettings

log = get_logger("vision")


class VisionServer:
    """The VisionEncoder service on ``settings.host:settings.port`` (0 = a free port, see ``port``)."""

    def __init__(self, settings: VisionSettings) -> None:
        self.settings = settings
        self.servicer = VisionEncoderServicer(settings)

        def register(server: grpc.aio.Server) -> list[str]:
            vision_pb2_grpc.add_VisionEncoderServicer_to_server(self.servicer, server)
            return [SERVICE_NAME]

        self.server, self.port, self.health = create_server(settings, register)

    def _load(self, bundle: ModelBundle | None) -> VisionEngine:
        if bundle is None:
            bundle = ModelBundle(
                self.settings.bundle,
                providers=self.settings.providers,
                intra_op_threads=self.settings.intra_op_threads,
                inter_op_threads=self.settings.inter_op_threads,
            )
        return VisionEngine(bundle, self.settings)

    async def start(self, bundle: ModelBundle | None = None) -> None:
        """Start serving, load ``bundle`` (default: ``settings.bundle``) in a thread, then report SERVING.

        Raises:
            NotFound / ValueError: the bundle is missing or does not fit this service (the server is
                stopped first).
        """
        await self.server.start()
        try:
            engine = await asyncio.to_thread(self._load, bundle)
        except BaseException:
            await self.stop(0)
            raise
        self.servicer.attach(engine)
        await mark_serving(self.health, [SERVICE_NAME])
        log.info("vision encoder serving", port=self.port, bundle=str(engine.bundle.path))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, give in-flight ones ``grace_s`` (default ``shutdown_grace_s``), free threads."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        await self.servicer.close()


async def serve_vision(settings: VisionSettings, bundle: ModelBundle | None = None) -> None:
    """Run the vision encoder until SIGTERM/SIGINT (then drain for ``shutdown_grace_s``)."""
    server = VisionServer(settings)
    metrics_http, metrics_port = start_metrics_server(settings.metrics_port, settings.host)
    await server.start(bundle)
    log.info("listening", port=server.port, metrics_port=metrics_port)
    try:
        await serve(server.server, server.health, settings.shutdown_grace_s)
    finally:
        await server.servicer.close()
        if metrics_http is not None:
            metrics_http.shutdown()


def run_vision_server(settings: VisionSettings) -> None:
    """Entry point of ``gemma-mesh serve vision``: configure logging and serve (blocks)."""
    configure_logging(settings.log_level)
    asyncio.run(serve_vision(settings))
