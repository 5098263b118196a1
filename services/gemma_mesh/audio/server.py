"""Build, start and run the audio frontend's gRPC server (``gemma-mesh serve audio``).

``AudioServer(settings)`` binds the port with health (not ready) and reflection; ``start(bundle)``
loads the bundle and the engine off the event loop (calls meanwhile get UNAVAILABLE), then reports
SERVING; ``stop(grace_s)`` drains. The lifecycle is ``common.service.BundleService``'s. Tests run it
in-process on port 0.
"""

from __future__ import annotations

import grpc

from gemma_mesh.audio.servicer import SERVICE_NAME, AudioFrontendServicer
from gemma_mesh.audio.serving import AudioEngine
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.common.service import BundleService, run_service, serve_until_signal
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import audio_pb2_grpc


class AudioServer(BundleService):
    """The audio frontend on ``settings.host:settings.port`` (0 = a free port, see ``port``)."""

    service_name = SERVICE_NAME

    def __init__(self, settings: AudioSettings) -> None:
        super().__init__(settings, AudioFrontendServicer(settings))

    def register(self, server: grpc.aio.Server) -> None:
        audio_pb2_grpc.add_AudioFrontendServicer_to_server(self.servicer, server)

    def build_engine(self, bundle: ModelBundle) -> AudioEngine:
        return AudioEngine(bundle, self.settings)

    def attach(self, engine: AudioEngine) -> None:
        self.servicer.engine = engine


async def serve_audio(settings: AudioSettings, bundle: ModelBundle | None = None) -> None:
    """Run the audio frontend until SIGTERM/SIGINT (then drain for ``shutdown_grace_s``)."""
    await serve_until_signal(AudioServer(settings), bundle)


def run_audio_server(settings: AudioSettings) -> None:
    """Entry point of ``gemma-mesh serve audio``: configure logging and serve (blocks)."""
    run_service(lambda: AudioServer(settings), settings.log_level)
