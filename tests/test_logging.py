"""Credentials never reach a log, whatever the level (keys are secrets; the README promises it)."""

from __future__ import annotations

import logging

from gemma_mesh.common.logging import configure_logging


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_credential_headers_and_tokens_are_redacted_at_debug():
    """On the loggers that log handshakes (uvicorn's, which uvicorn may stop propagating) and, for
    their children, on the root handlers present when logging is configured."""
    names = ("uvicorn.error", "websockets.server", "httpx")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    root_handler = ListHandler()
    own = ListHandler()
    logging.getLogger().addHandler(root_handler)
    try:
        configure_logging("DEBUG")
        logging.getLogger("uvicorn.error").addHandler(own)  # uvicorn's own handler, not the root's
        for lg in loggers:
            lg.setLevel(logging.DEBUG)
        logging.getLogger("uvicorn.error").propagate = False
        logging.getLogger("uvicorn.error").debug("< %s: %s", "authorization", "Bearer sk-tenant-key-999")
        logging.getLogger("uvicorn.error").debug("< %s: %s", "host", "127.0.0.1:8000")
        logging.getLogger("websockets.server").debug("< Cookie: session=abc123")
        logging.getLogger("websockets.server").debug(
            '< TEXT \'{"type": "session.start", "token": "v1.k.999.sig"}\' [52 bytes]'
        )
        logging.getLogger("httpx").debug("X-API-Key = sk-other")
    finally:
        logging.getLogger().removeHandler(root_handler)
        logging.getLogger("uvicorn.error").removeHandler(own)
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.setLevel(level)
            lg.propagate = propagate
    text = "\n".join(own.messages + root_handler.messages)
    for secret in ("sk-tenant-key-999", "abc123", "sk-other", "v1.k.999.sig"):
        assert secret not in text
    assert "< host: 127.0.0.1:8000" in text  # other headers are left alone
    assert len(own.messages) == 2 and text.count("[redacted]") == 4
