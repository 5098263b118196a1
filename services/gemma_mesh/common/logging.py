"""Structured logging (structlog) configured once per process.

Logs are JSON lines when stderr is not a terminal (containers, CI) and coloured key=value
pairs on a terminal. Library loggers (onnxruntime, grpc) go through the same pipeline.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

_configured = False


# Header lines third-party libraries log at DEBUG (the websockets handshake through uvicorn's
# "uvicorn.error" logger: "< authorization: Bearer ..."): the value never reaches a log.
_SECRET_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|cookie|set-cookie|x-api-key)(\s*[:=]\s*)\S.*"
)
# A browser session token inside a logged WebSocket frame ({"token": "..."}), even when cut short.
_TOKEN_FIELD = re.compile(r'("token"\s*:\s*")[^"]*("?)')

REDACTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "httpx", "httpcore")


class RedactSecrets(logging.Filter):
    """Replace the value of credential headers, and of a ``"token"`` field of a logged WebSocket
    message, in a log record's message with ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _TOKEN_FIELD.sub(r"\1[redacted]\2", _SECRET_HEADER.sub(r"\1\2[redacted]", message))
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACT = RedactSecrets()


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Configure structlog and the standard ``logging`` root logger.

    Args:
        level: a standard level name (``DEBUG``, ``INFO``, ...).
        json: force JSON output (True) or console output (False); by default JSON unless
            stderr is a TTY.
    """
    global _configured
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached: a server reconfigures the level after the CLI has configured its default.
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    # On the loggers that log headers (logger filters survive uvicorn's dictConfig) and on the root
    # handlers (records of their child loggers, "websockets.server", pass there).
    for target in [*(logging.getLogger(name) for name in REDACTED_LOGGERS), *logging.getLogger().handlers]:
        if _REDACT not in target.filters:
            target.addFilter(_REDACT)
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger bound to ``component=name``; configures defaults on first use."""
    if not _configured:
        configure_logging()
    # A lazy proxy (no .bind() here): it resolves the configuration when used, so a service that
    # sets its level after import (the CLI configures WARNING first) still gets its INFO logs.
    return structlog.get_logger(component=name)
