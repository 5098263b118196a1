"""The browser-token HMAC key the gateway replicas of one mesh share, when none is configured.

A token minted by one replica (``POST /v1/stream/token``) is presented to whichever replica the
WebSocket lands on, so every replica must hold the same key. Generating it in the Helm chart does
not work under ``helm template`` (Argo CD, Flux): ``lookup`` sees no cluster there, so every sync
would render a new key. Instead the first gateway to start writes a random key into Redis
(``SET <prefix>:token-secret <key> NX``, no expiry) and every replica reads that one. A configured
``token_secret`` always wins; without Redis the key is per process (one replica).
"""

from __future__ import annotations

import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gemma_mesh.common.logging import get_logger

log = get_logger(__name__)

TOKEN_SECRET_BYTES = 32


def token_secret_key(prefix: str) -> str:
    """The Redis key of the shared token secret."""
    return f"{prefix}:token-secret"


async def shared_token_secret(redis_url: str, prefix: str, timeout_s: float = 2.0) -> str | None:
    """The mesh's shared token secret from Redis, created by the first caller (hex, 64 characters);
    None when Redis does not answer (the caller falls back to a per-process key and says so)."""
    client = aioredis.Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
    )
    key = token_secret_key(prefix)
    try:
        await client.set(key, secrets.token_hex(TOKEN_SECRET_BYTES), nx=True)
        value = await client.get(key)
    except (RedisError, OSError) as error:
        log.warning(
            "no shared token secret: Redis did not answer; tokens minted here are accepted by this "
            "replica only (set token_secret to avoid this)",
            error=str(error),
        )
        return None
    finally:
        await client.aclose()
    return value
