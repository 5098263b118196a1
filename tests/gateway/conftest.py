"""Gateway fixtures: the real mesh (three gRPC services on loopback) and a gateway in front of it."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from tests.gateway.mesh import Backends, GatewayThread, start_backends

# The Redis key prefix of the secured gateway: per test run, so sessions an earlier run left in the
# shared Redis (they live for session_ttl_s) never count against this run's per-key limits.
SECURED_PREFIX = f"gemma-mesh-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def backends(tiny_bundle) -> Backends:
    """Decoder, audio frontend and vision encoder on free loopback ports, for the whole test session."""
    with contextlib.ExitStack() as stack:
        yield start_backends(tiny_bundle, stack)


@pytest.fixture(scope="session")
def embedded_backends() -> Backends:
    """The three services on the embedded tiny bundle (no export needed), for the whole session."""
    from gemma_mesh.model.bundle import ModelBundle

    with contextlib.ExitStack() as stack:
        yield start_backends(ModelBundle(None, providers=["CPUExecutionProvider"]), stack)


@pytest.fixture(scope="session")
def gateway_url(backends: Backends) -> str:
    """A gateway (in-process store, no API keys) in front of ``backends``: ``http://127.0.0.1:PORT``."""
    with GatewayThread(backends.gateway_settings()) as url:
        yield url


@pytest.fixture(scope="session")
def secured_gateway_url(backends: Backends) -> str:
    """A gateway with API keys ``test-key-1``/``test-key-2``, Redis sessions and small per-key limits."""
    settings = backends.gateway_settings(
        api_keys=["test-key-1", "test-key-2"],
        redis_url="redis://127.0.0.1:6379/0",
        redis_key_prefix=SECURED_PREFIX,  # this run's own keys: nothing left by another run counts
        max_sessions_per_key=2,
        allowed_origins=["http://allowed.example"],
    )
    with GatewayThread(settings) as url:
        yield url
