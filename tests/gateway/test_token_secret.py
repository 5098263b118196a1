"""Without a configured ``token_secret``, gateway replicas sharing a Redis share one token key: a
token minted by one replica opens a session on another (real Redis, real gateways, real sockets)."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import redis

from gemma_mesh.gateway.token_secret import token_secret_key
from tests.gateway.mesh import Backends, GatewayThread
from tests.gateway.test_auth_limits import first_event

REDIS_URL = "redis://127.0.0.1:6379/0"


def _settings(backends: Backends, prefix: str, **overrides):
    return backends.gateway_settings(
        api_keys=["test-key-shared-1"], redis_url=REDIS_URL, redis_key_prefix=prefix, **overrides
    )


def _token(url: str) -> str:
    reply = httpx.post(f"{url}/v1/stream/token", headers={"Authorization": "Bearer test-key-shared-1"})
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


def test_replicas_share_a_token_key_through_redis(embedded_backends: Backends) -> None:
    prefix = f"gemma-mesh-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with GatewayThread(_settings(embedded_backends, prefix)) as first:
            with GatewayThread(_settings(embedded_backends, prefix)) as second:
                started = asyncio.run(first_event(second, {"token": _token(first)}))
                assert started["type"] == "session.started", json.dumps(started)
        stored = client.get(token_secret_key(prefix))
        assert stored is not None and len(stored) == 64
        # A replica with its own configured key does not accept the shared one's tokens.
        with GatewayThread(_settings(embedded_backends, prefix)) as shared:
            with GatewayThread(_settings(embedded_backends, prefix, token_secret="x" * 64)) as own:
                refused = asyncio.run(first_event(own, {"token": _token(shared)}))
                assert refused["type"] == "error" and refused["code"] == "authentication_error"
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
