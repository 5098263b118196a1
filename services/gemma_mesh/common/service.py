"""The lifecycle every gRPC service shares: bind, load the bundle off the event loop, serve, drain.

``BundleService`` binds the port first (readiness NOT_SERVING on ``""`` and on the service, liveness
SERVING; calls get UNAVAILABLE while the bundle loads), builds the service's engine in a worker
thread (every graph it needs loaded and run once: ``build_engine``'s contract), attaches it to the
servicer and only then reports SERVING (``common.health``). Subclasses say how to register the
servicer and build the engine. ``run_service`` and ``module_main`` are the blocking entry points
behind ``gemma-mesh serve ...`` and ``python -m gemma_mesh.<service>``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc

from gemma_mesh.common.grpc_server import (
    create_server,
    limit_blas_threads,
    serve,
    start_metrics_server,
)
from gemma_mesh.common.logging import configure_logging, get_logger
from gemma_mesh.common.settings import GrpcServiceSettings

log = get_logger("service")


class BundleService(ABC):
    """One gRPC service over a model bundle. Subclasses set ``service_name`` and implement
    ``register`` (add the servicer to the server) and ``build_engine`` (runs in a worker thread)."""

    service_name: ClassVar[str]
    # The Prometheus registry ``serve_until_signal`` exposes (None: the process-wide one).
    metrics_registry: Any = None

    def __init__(self, settings: GrpcServiceSettings, servicer: Any) -> None:
        self.settings = settings
        self.servicer = servicer
        self.server, self.port, self.health = create_server(settings, self._register)

    def _register(self, server: grpc.aio.Server) -> list[str]:
        self.register(server)
        return [self.service_name]

    @abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Add ``self.servicer`` to ``server``."""

    @abstractmethod
    def build_engine(self, bundle: Any) -> Any:
        """Build the service's engine on a ``ModelBundle`` (called in a worker thread). It returns
        with every graph the service needs loaded and run once: SERVING follows at once, and the
        first request must not pay for a session or a first run (GPU memory grows before Ready)."""

    def attach(self, engine: Any) -> None:
        """Hand the loaded engine to the servicer (default: ``servicer.attach(engine)``)."""
        self.servicer.attach(engine)

    def _load(self, bundle: Any) -> Any:
        from gemma_mesh.model.bundle import ModelBundle

        return self.build_engine(bundle if bundle is not None else ModelBundle.from_settings(self.settings))

    async def start(self, bundle: Any = None) -> None:
        """Start serving, load ``bundle`` (default: ``settings.bundle``) in a thread, then report SERVING.

        Raises:
            NotFound / ValueError: the bundle is missing or does not fit this service (the server is
                stopped first).
        """
        await self.health.loading()
        await self.server.start()
        try:
            engine = await asyncio.to_thread(self._load, bundle)
        except BaseException:
            await self.stop(0)
            raise
        self.attach(engine)
        await self.health.serving()
        log.info("serving", service=self.service_name, port=self.port, bundle=str(engine.bundle.path))

    async def close_servicer(self) -> None:
        result = self.servicer.close()
        if inspect.isawaitable(result):
            await result

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, give in-flight ones ``grace_s`` (default ``shutdown_grace_s``), free threads."""
        await self.health.draining()
        await self.server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        await self.close_servicer()


async def serve_until_signal(service: BundleService, bundle: Any = None) -> None:
    """Start ``service`` with its metrics endpoint and run it until SIGTERM/SIGINT, then drain."""
    settings = service.settings
    metrics_http, metrics_port = start_metrics_server(
        settings.metrics_port, settings.host, service.metrics_registry
    )
    await service.start(bundle)
    log.info("listening", service=service.service_name, port=service.port, metrics_port=metrics_port)
    try:
        await serve(service.server, service.health, settings.shutdown_grace_s)
    finally:
        await service.close_servicer()
        if metrics_http is not None:
            metrics_http.shutdown()


def run_service(factory: Callable[[], BundleService], log_level: str) -> None:
    """Blocking entry point: configure logging, build the service inside the event loop, serve."""
    configure_logging(log_level)

    async def main() -> None:
        service = factory()
        limit_blas_threads(service.settings.blas_threads)
        await serve_until_signal(service)

    asyncio.run(main())


def module_main(
    prog: str, description: str | None, settings_cls: type[GrpcServiceSettings], run: Callable[[Any], None]
) -> Callable[[list[str] | None], None]:
    """``python -m gemma_mesh.<service>``: flags that override the environment, then ``run(settings)``."""

    def main(argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        parser.add_argument(
            "--bundle", type=Path, help="bundle directory (default: the embedded tiny bundle)"
        )
        parser.add_argument("--host", help="interface to bind")
        parser.add_argument("--port", type=int, help="gRPC port (0 = a free one)")
        parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
        parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
        args = parser.parse_args(argv)
        run(settings_cls(**{k: v for k, v in vars(args).items() if v is not None}))

    return main
