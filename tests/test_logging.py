"""Credentials never reach a log, whatever the level (keys are secrets; the README promises it)."""

from __future__ import annotations

import logging

from gemma_mesh.common.logging import configure_logging


def test_credential_headers_are_redacted_at_debug(caplog):
    configure_logging("DEBUG")
    with caplog.at_level(logging.DEBUG):
        # websockets' handshake lines, as uvicorn's websockets implementation logs them
        logging.getLogger("uvicorn.error").debug("< %s: %s", "authorization", "Bearer sk-tenant-key-999")
        logging.getLogger("websockets.server").debug("< Cookie: session=abc123")
        logging.getLogger("httpx").debug("X-API-Key = sk-other")
        logging.getLogger("uvicorn.error").debug("< %s: %s", "host", "127.0.0.1:8000")
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("sk-tenant-key-999", "abc123", "sk-other"):
        assert secret not in text
    assert text.count("[redacted]") == 3
    assert "< host: 127.0.0.1:8000" in text  # other headers are left alone
