"""Build and run the decoder's gRPC server (``gemma-mesh serve decoder``).

``DecoderServer(settings)`` binds the port with health (readiness NOT_SERVING, liveness SERVING)
and reflection; ``start(bundle)`` builds the engine off the event loop (both graphs loaded, one
warm-up request run through the scheduler; calls meanwhile get UNAVAILABLE "still loading"), then
reports SERVING. An engine that breaks (``Engine.on_broken``) turns readiness and liveness
NOT_SERVING. The lifecycle is ``common.service.BundleService``'s.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np

from gemma_mesh.common.grpc_server import start_metrics_server
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.service import BundleService, run_service, serve_until_signal
from gemma_mesh.decoder.engine import Engine, GenerationRequest
from gemma_mesh.decoder.metrics import DecoderMetrics
from gemma_mesh.decoder.servicer import DecoderServicer
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import decoder_pb2, decoder_pb2_grpc

log = get_logger("decoder.server")
SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name


def warm_up(engine: Engine, timeout_s: float = 600.0) -> None:
    """Run one request through ``engine``'s running scheduler (a one-token prompt, the bundle's BOS
    or pad, then one decode step), so that the first real request finds both graphs initialised and
    run once (ONNX Runtime allocates its arenas and, on CUDA, picks its kernels on the first run).

    Raises:
        MeshError: the warm-up request failed (the bundle cannot serve).
    """
    tokens = engine.bundle.manifest.special_tokens
    first = tokens["bos"].id if "bos" in tokens else tokens["pad"].id
    request = GenerationRequest(
        request_id="warm-up", input_ids=np.array([first], dtype=np.int64), max_tokens=2, ignore_eos=True
    )
    started = time.monotonic()
    for _ in engine.submit(request).iter_events(timeout_s=timeout_s):
        pass
    log.info("warmed up", steps=engine.steps, seconds=round(time.monotonic() - started, 3))


class DecoderServer(BundleService):
    """The decoder on ``settings.host:settings.port`` (0 = a free port, see ``port``); ``engine`` is
    None until ``start`` has loaded and warmed it."""

    service_name = SERVICE_NAME

    def __init__(self, settings: DecoderSettings) -> None:
        self.metrics = DecoderMetrics()
        self.metrics_registry = self.metrics.registry
        self.engine: Engine | None = None
        self.metrics_server: Any = None
        self.metrics_port: int | None = None
        super().__init__(settings, DecoderServicer(None, settings))

    def register(self, server: grpc.aio.Server) -> None:
        decoder_pb2_grpc.add_DecoderServicer_to_server(self.servicer, server)

    def build_engine(self, bundle: ModelBundle) -> Engine:
        engine = Engine(bundle, self.settings, self.metrics)
        engine.start()
        try:
            warm_up(engine)
        except BaseException:
            engine.stop()
            raise
        return engine

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        self.servicer.engine = engine
        engine.on_broken = self.health.engine_broken
        log.info(
            "decoder loaded",
            providers=engine.bundle.providers,
            max_batch_size=self.settings.max_batch_size,
        )

    async def close_servicer(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None


async def start_decoder(settings: DecoderSettings, bundle: ModelBundle | None = None) -> DecoderServer:
    """A started decoder (SERVING) with its metrics endpoint (``settings.metrics_port``), for tests
    and benchmarks that run it in-process; ``stop(grace_s)`` drains it."""
    service = DecoderServer(settings)
    service.metrics_server, service.metrics_port = start_metrics_server(
        settings.metrics_port, settings.host, service.metrics_registry
    )
    try:
        await service.start(bundle)
    except BaseException:
        await service.close_servicer()
        raise
    return service


async def serve_decoder(settings: DecoderSettings, bundle: ModelBundle | None = None) -> None:
    """Run the decoder until SIGTERM/SIGINT (then drain for ``shutdown_grace_s``)."""
    await serve_until_signal(DecoderServer(settings), bundle)


def run_decoder_server(settings: DecoderSettings) -> None:
    """Entry point of ``gemma-mesh serve decoder``: configure logging and serve (blocks)."""
    run_service(lambda: DecoderServer(settings), settings.log_level)
