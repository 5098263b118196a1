"""uvicorn's WebSocket protocol plus a probe of what the client has not taken yet.

``BacklogWebSocketProtocol`` is uvicorn's default (sans-I/O websockets) protocol; it adds
``scope["extensions"]["gemma_mesh.unacked_bytes"]``: ``() -> int``, the bytes written for this
connection that the client's TCP stack has not acknowledged (the transport's buffer plus the
kernel's send queue, ``SIOCOUTQ`` on Linux). ``outbound.Outbound`` measures a client's backlog
with it. The ASGI spec has no such extension; on another server the key is absent.
"""

from __future__ import annotations

import array
import fcntl
import sys
import termios

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gemma_mesh.gateway.outbound import UNACKED_BYTES


class BacklogWebSocketProtocol(WebSocketsSansIOProtocol):
    """``WebSocketsSansIOProtocol`` whose scope carries the ``UNACKED_BYTES`` probe."""

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app task reads it on its first step, after this returns
            scope["extensions"][UNACKED_BYTES] = self.unacked_bytes

    def unacked_bytes(self) -> int:
        """Bytes written for this connection that the peer has not acknowledged (0 once closed)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        pending = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None and sys.platform == "linux":
            queued = array.array("i", [0])
            try:
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued, True)  # SIOCOUTQ
            except OSError:
                return pending
            pending += queued[0]
        return pending
