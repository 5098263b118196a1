"""Named error classes, mapped once to gRPC status codes, HTTP statuses and WebSocket close codes.

Services raise these; the transport adapters (gRPC interceptor, FastAPI handlers, WebSocket
adapter) convert them with the tables below, so no module builds a status code by hand.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error the mesh reports to a caller.

    Attributes:
        message: a sentence for the caller that names the problem and, where one applies, the limit.
        param: the request field at fault, when there is one (OpenAI's ``param``).
    """

    code = "internal_error"
    grpc_status = "INTERNAL"
    http_status = 500
    ws_close_code = 1011

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(MeshError, ValueError):
    """The caller's input is wrong (shape, size, format, limit). Never retried as is."""

    code = "invalid_request_error"
    grpc_status = "INVALID_ARGUMENT"
    http_status = 400
    ws_close_code = 1008


class PayloadTooLarge(InvalidRequest):
    """A request body or upload over its byte limit (HTTP 413; OpenAI's ``invalid_request_error``)."""

    http_status = 413


class NotFound(MeshError, LookupError):
    """A named thing (model, session, graph) does not exist."""

    code = "not_found_error"
    grpc_status = "NOT_FOUND"
    http_status = 404
    ws_close_code = 1008


class Overloaded(MeshError):
    """A bounded queue is full; the caller may retry later."""

    code = "overloaded_error"
    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429
    ws_close_code = 1013


class EngineDead(MeshError):
    """The engine cannot serve (failed to load, crashed). The service is not ready."""

    code = "engine_unavailable"
    grpc_status = "UNAVAILABLE"
    http_status = 503
    ws_close_code = 1011


class Unauthenticated(MeshError):
    """No API key or session token, or one that is unknown or expired."""

    code = "authentication_error"
    grpc_status = "UNAUTHENTICATED"
    http_status = 401
    ws_close_code = 1008


class PermissionDenied(MeshError):
    """The caller is known but not allowed this (origin not allowed, a per-key limit reached)."""

    code = "permission_error"
    grpc_status = "PERMISSION_DENIED"
    http_status = 403
    ws_close_code = 1008


class RateLimited(MeshError):
    """A per-key limit (sessions per key, requests in flight) is reached; retry later."""

    code = "rate_limit_error"
    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429
    ws_close_code = 1013


class SessionBusy(MeshError):
    """The session is attached to another connection that did not let go in time."""

    code = "session_busy"
    grpc_status = "ABORTED"
    http_status = 409
    ws_close_code = 1013


class BackendUnavailable(MeshError):
    """A service the request needs (decoder, encoder, Redis) cannot be reached right now."""

    code = "backend_unavailable"
    grpc_status = "UNAVAILABLE"
    http_status = 503
    ws_close_code = 1011


ERRORS_BY_GRPC_STATUS: dict[str, type[MeshError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "OUT_OF_RANGE": InvalidRequest,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": BackendUnavailable,
    "DEADLINE_EXCEEDED": BackendUnavailable,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
}
"""How a client maps a backend's gRPC status back onto the error classes (anything else: MeshError)."""
