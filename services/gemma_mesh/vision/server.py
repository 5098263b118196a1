"""Build, start and run the vision encoder's gRPC server (``gemma-mesh serve vision``).

``VisionServer(settings)`` binds the port with health (not ready) and reflection; ``start(bundle)``
loads the bundle and the engine off the event loop (calls meanwhile get UNAVAILABLE), then reports
SERVING; ``stop(grace_s)`` drains. The lifecycle is ``common.service.BundleService``'s. Tests run it
in-process on port 0.
"""

from __future__ import annotations

import grpc

from gemma_mesh.common.service import BundleService, run_service, serve_until_signal
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import vision_pb2_grpc
from gemma_mesh.vision.servicer import SERVICE_NAME, VisionEncoderServicer
from gemma_mesh.vision.serving import VisionEngine
from gemma_mesh.vision.settings import VisionSettings


class VisionServer(BundleService):
    """The vision encoder on ``settings.host:settings.port`` (0 = a free port, see ``port``)."""

    service_name = SERVICE_NAME

    def __init__(self, settings: VisionSettings) -> None:
        super().__init__(settings, VisionEncoderServicer(settings))

    def register(self, server: grpc.aio.Server) -> None:
        vision_pb2_grpc.add_VisionEncoderServicer_to_server(self.servicer, server)

    def build_engine(self, bundle: ModelBundle) -> VisionEngine:
        return VisionEngine(bundle, self.settings)


async def serve_vision(settings: VisionSettings, bundle: ModelBundle | None = None) -> None:
    """Run the vision encoder until SIGTERM/SIGINT (then drain for ``shutdown_grace_s``)."""
    await serve_until_signal(VisionServer(settings), bundle)


def run_vision_server(settings: VisionSettings) -> None:
    """Entry point of ``gemma-mesh serve vision``: configure logging and serve (blocks)."""
    run_service(lambda: VisionServer(settings), settings.log_level)
