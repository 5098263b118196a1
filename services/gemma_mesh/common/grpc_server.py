"""Building, running and calling gRPC services the same way everywhere (grpc.aio).

- ``create_server(settings, register)`` -> ``(server, port, health)``: message size limits, the error
  interceptor, ``grpc.health.v1`` and server reflection; ``register`` adds the service's servicers.
- ``ErrorInterceptor`` converts ``MeshError`` subclasses to status codes in one place (TGI's
  ``ExceptionInterceptor``); unexpected exceptions are logged once and become INTERNAL.
- ``serve(server, health, grace_s)`` runs until SIGTERM/SIGINT, then drains with ``stop(grace)``.
- ``open_channel(target, max_message_bytes)`` is the client side with the same limits and
  client-side round-robin over every address a DNS name resolves to (headless Services).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gemma_mesh.common.errors import MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.settings import GrpcServiceSettings
from gemma_mesh.proto.v1 import common_pb2

log = get_logger("grpc")

ERROR_DETAIL_KEY = "gemma-mesh-error-bin"


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that raise gRPC's 4 MiB default message limits (both directions)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _status(error: MeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_status)


async def _abort(context: grpc.aio.ServicerContext, error: MeshError) -> None:
    detail = common_pb2.ErrorDetail(code=error.code, message=error.message, param=error.param or "")
    await context.abort(
        _status(error), error.message, trailing_metadata=((ERROR_DETAIL_KEY, detail.SerializeToString()),)
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ``MeshError`` to its status code; any other exception to INTERNAL (logged with its stack)."""

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        async def guard(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            if isinstance(exc, MeshError):
                log.info("request refused", method=method, code=exc.grpc_status, reason=exc.message)
                await _abort(context, exc)
            log.exception("unexpected error", method=method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

        def unary(behavior: Callable) -> Callable:
            async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request_or_iterator, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await guard(context, exc)

            return wrapped

        def streaming(behavior: Callable) -> Callable:
            async def wrapped(
                request_or_iterator: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(request_or_iterator, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await guard(context, exc)

            return wrapped

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)


def create_server(
    settings: GrpcServiceSettings, register: Callable[[grpc.aio.Server], Iterable[str]]
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build a grpc.aio server on ``settings.host:settings.port`` (0 = a free port).

    Args:
        register: adds the servicers and returns their full service names (for health and reflection).

    Returns:
        ``(server, bound_port, health_servicer)``; a service is unknown to health checks (NOT_FOUND,
        i.e. not ready) until the caller marks it ready with ``await mark_serving(...)``.
    """
    options = [
        *message_options(settings.max_message_bytes),
        # Clients re-resolve DNS only when a connection closes: ageing connections out lets the
        # gateway's round_robin see pods added by a scale-up (headless Services in Kubernetes).
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_s * 1000) + 60_000),
    ]
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.host}:{settings.port}")
    return server, port, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
    """Report every service (and the server as a whole, "") as SERVING."""
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, grace_s: float) -> None:
    """Run ``server`` (already started) until SIGTERM/SIGINT; then NOT_SERVING and ``stop(grace_s)``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wait_server = asyncio.create_task(server.wait_for_termination())
    wait_signal = asyncio.create_task(stop.wait())
    await asyncio.wait([wait_server, wait_signal], return_when=asyncio.FIRST_COMPLETED)
    await health_servicer.enter_graceful_shutdown()
    log.info("shutting down", grace_s=grace_s)
    await server.stop(grace_s)
    wait_signal.cancel()


def open_channel(target: str, max_message_bytes: int) -> grpc.aio.Channel:
    """An insecure grpc.aio channel with raised message limits and round-robin over resolved addresses.

    For Kubernetes use a headless Service (``dns:///decoder-headless:50051``): kube-proxy balances
    connections, not requests, and gRPC connections are long-lived, so the client balances itself.
    """
    service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    options = [*message_options(max_message_bytes), ("grpc.service_config", service_config)]
    return grpc.aio.insecure_channel(target, options=options)


def error_detail(error: grpc.aio.AioRpcError) -> common_pb2.ErrorDetail | None:
    """The ``ErrorDetail`` a gemma-mesh server attached to ``error``, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return common_pb2.ErrorDetail.FromString(value)
    return None


def start_metrics_server(port: int | None, host: str, registry: Any = None) -> tuple[Any, int | None]:
    """Serve Prometheus ``/metrics`` of ``registry`` (default: the global one) on ``host:port`` (0 = free port).

    Returns:
        ``(http_server, bound_port)`` (``http_server.shutdown()`` stops it), or ``(None, None)`` if port is None.
    """
    if port is None:
        return None, None
    from prometheus_client import REGISTRY, start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry or REGISTRY)
    return server, int(server.server_port)


def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS thread pool at ``threads`` for this process (0 leaves the library's default).

    OpenBLAS starts one busy-waiting thread per core; on a machine shared by several services a
    5 s log-mel matmul then costs twice its CPU time for no gain in latency (measured: 11.4 ms of
    CPU for 5.7 ms of wall time with 2 threads, 6.1 ms for 6.1 ms with 1). Uses ``threadpoolctl``.
    """
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
