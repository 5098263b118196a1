"""Building, running and calling gRPC services the same way everywhere (grpc.aio).

- ``create_server(settings, register)`` -> ``(server, port, health)``: message size limits, keepalive
  enforcement, the error interceptor, ``grpc.health.v1`` (``common.health.ServiceHealth``: not ready
  until the caller says so) and server reflection; ``register`` adds the service's servicers.
- ``ErrorInterceptor`` converts ``MeshError`` subclasses to status codes in one place (TGI's
  ``ExceptionInterceptor``); unexpected exceptions are logged once and become INTERNAL.
- ``serve(server, health, grace_s)`` runs until SIGTERM/SIGINT, then drains with ``stop(grace)``.
- ``open_channel(target, max_message_bytes, keepalive)`` is the client side with the same limits,
  client-side round-robin over every address a DNS name resolves to (headless Services), HTTP/2
  keepalive pings (a lost node is noticed in ``time_s + timeout_s``, not at each call's deadline)
  and gRPC's retry policy for the idempotent unary calls (``retry_service_config``).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gemma_mesh.common.errors import InvalidRequest, MeshError
from gemma_mesh.common.health import ServiceHealth
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.net import check_port_free
from gemma_mesh.common.settings import GrpcServiceSettings
from gemma_mesh.proto.v1 import audio_pb2, common_pb2, decoder_pb2, vision_pb2

log = get_logger("grpc")

ERROR_DETAIL_KEY = "gemma-mesh-error-bin"
# Servers accept client keepalive pings this often at most (gRPC's default, 5 min, would make a
# server answer a client pinging every 20 s with GOAWAY "too_many_pings" and drop its calls).
MIN_CLIENT_PING_INTERVAL_MS = 10_000


@dataclass(frozen=True)
class KeepaliveSettings:
    """HTTP/2 keepalive and retries of a client channel (``GatewaySettings.grpc_*``).

    ``time_s``: a ping after this long without a frame, calls or not; ``timeout_s``: no ack in that
    long closes the connection and its calls fail UNAVAILABLE (a node that vanished without a FIN
    is noticed in ``time_s + timeout_s``). ``retry_attempts``: total attempts (first included) of an
    idempotent unary call that got UNAVAILABLE (a pod draining or gone); 1 = no retries.
    """

    time_s: float = 20.0
    timeout_s: float = 10.0
    retry_attempts: int = 3


def idempotent_unary_methods() -> list[dict[str, str]]:
    """``{"service", "method"}`` of every unary-unary RPC of the mesh's protos and of grpc.health.v1:
    each is a pure function of its request, so running it twice costs compute and changes nothing.
    Streaming calls (``Decoder.Generate``, ``AudioFrontend.EncodeStream``) are not retried here: a
    stream that delivered a message cannot be replayed by the channel."""
    names = [{"service": "grpc.health.v1.Health", "method": "Check"}]
    for module in (audio_pb2, decoder_pb2, vision_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if not method.client_streaming and not method.server_streaming:
                    names.append({"service": service.full_name, "method": method.name})
    return names


def retry_service_config(keepalive: KeepaliveSettings) -> dict[str, Any]:
    """The channel's gRPC service config: round_robin, and UNAVAILABLE retried with exponential
    backoff for ``idempotent_unary_methods`` (gRFC A6; grpc-go and grpc-java read the same JSON)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if keepalive.retry_attempts > 1:
        config["methodConfig"] = [
            {
                "name": idempotent_unary_methods(),
                "retryPolicy": {
                    "maxAttempts": min(keepalive.retry_attempts, 5),  # gRPC caps it at 5
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


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
) -> tuple[grpc.aio.Server, int, ServiceHealth]:
    """Build a grpc.aio server on ``settings.host:settings.port`` (0 = a free port).

    Args:
        register: adds the servicers and returns their full service names (for health and reflection).

    Returns:
        ``(server, bound_port, health)``. Call ``await health.loading()`` before ``server.start()``
        (readiness NOT_SERVING, liveness SERVING) and ``await health.serving()`` once loaded.
    """
    options = [
        *message_options(settings.max_message_bytes),
        # Clients re-resolve DNS only when a connection closes: ageing connections out lets the
        # gateway's round_robin see pods added by a scale-up (headless Services in Kubernetes).
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_s * 1000) + 60_000),
        # Ping clients: a stream whose client vanished (no FIN) is cancelled after time + timeout
        # instead of decoding for nobody until its deadline.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        # Let clients keep idle connections alive with pings (see KeepaliveSettings).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
        # gRPC's default SO_REUSEPORT lets a second server bind a port that is in use and take a
        # share of its connections: a taken port must be an error instead.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
    names = list(register(server))
    health_servicer = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    # Checked first: gRPC would log its own bind failure to stderr before raising.
    check_port_free(settings.host, settings.port, what=f"the {', '.join(names)} service")
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises "Failed to bind to address ..." (a race with the check)
        raise InvalidRequest(f"cannot listen on {address}: {exc}") from exc
    return server, port, ServiceHealth(health_servicer, names)


async def serve(server: grpc.aio.Server, health: ServiceHealth, grace_s: float) -> None:
    """Run ``server`` (already started) until SIGTERM/SIGINT; then NOT_SERVING and ``stop(grace_s)``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wait_server = asyncio.create_task(server.wait_for_termination())
    wait_signal = asyncio.create_task(stop.wait())
    await asyncio.wait([wait_server, wait_signal], return_when=asyncio.FIRST_COMPLETED)
    await health.draining()
    log.info("shutting down", grace_s=grace_s)
    await server.stop(grace_s)
    wait_signal.cancel()


def channel_options(max_message_bytes: int, keepalive: KeepaliveSettings) -> list[tuple[str, Any]]:
    """Client channel options: message limits, keepalive pings and the service config."""
    return [
        *message_options(max_message_bytes),
        ("grpc.service_config", json.dumps(retry_service_config(keepalive))),
        ("grpc.enable_retries", 1 if keepalive.retry_attempts > 1 else 0),
        ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(keepalive.timeout_s * 1000)),
        # Ping idle connections too: the next call must not be the one that finds the peer gone.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", int(keepalive.time_s * 1000)),
    ]


def open_channel(
    target: str, max_message_bytes: int, keepalive: KeepaliveSettings | None = None
) -> grpc.aio.Channel:
    """An insecure grpc.aio channel: raised message limits, round-robin over resolved addresses,
    keepalive pings and UNAVAILABLE retries of idempotent unary calls (``channel_options``).

    For Kubernetes use a headless Service (``dns:///decoder-headless:50051``): kube-proxy balances
    connections, not requests, and gRPC connections are long-lived, so the client balances itself.
    """
    options = channel_options(max_message_bytes, keepalive or KeepaliveSettings())
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
