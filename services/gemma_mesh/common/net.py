"""Listening ports: one check, before a server binds, that turns a taken port into a clear error."""

from __future__ import annotations

import socket

from gemma_mesh.common.errors import InvalidRequest

MAX_PORT = 65535


def check_port_free(host: str, port: int, *, what: str) -> None:
    """Refuse ``host:port`` when no server of ours could listen there.

    Binds a probe socket with ``SO_REUSEADDR`` and without ``SO_REUSEPORT``, as the servers bind
    (uvicorn through asyncio, gRPC with ``grpc.so_reuseport`` off): connections of a just-stopped
    server left in TIME_WAIT do not block the port, a socket listening on it does. Port 0 (any free
    port) always passes.

    Args:
        host: interface name or address (IPv4 or IPv6, brackets allowed).
        port: TCP port, 0-65535.
        what: the server's name for the message ("the gateway", "the decoder").

    Raises:
        InvalidRequest: the port is out of range, the host does not resolve to a local address,
            or another socket listens on the port.
    """
    if not 0 <= port <= MAX_PORT:
        raise InvalidRequest(f"port {port} for {what} is not in 0-{MAX_PORT}")
    if port == 0:
        return
    bare_host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bare_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise InvalidRequest(f"cannot listen on {host}:{port} for {what}: {error.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise InvalidRequest(
                f"cannot listen on {host}:{port} for {what}: {error.strerror}; pick another port"
            ) from None
