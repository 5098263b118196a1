"""Which connection a session is attached to: a short lease, so a resume never races the old connection.

A connection holds its session's lease while it runs and refreshes it every ``refresh_s``. A new
connection resuming the session *claims* it: if another connection holds it, the claim records a
takeover request and the caller retries; the holder sees the request at its next refresh, finishes
what it received (the open segment's final is written to the log), releases the lease and closes.
The resuming connection then reads the session's final state and replays a complete log. A holder
that died (a killed replica) stops refreshing, and its lease expires after ``ttl_s``.

A refresh is one atomic step: keep the lease if it is ours, *re-take* it if it is absent (it lapsed
while Redis was unreachable or restarted empty, with nobody else claiming it), and give up only
when another connection holds it or asked to take over. A Redis outage longer than the lease thus
costs a live session nothing; only a real takeover closes the old connection (4001).

With Redis the lease is shared by every replica (``SET`` with ``PX`` and two small Lua scripts);
without it, an in-process table. Redis trouble never blocks a session: a lease operation that cannot
reach Redis counts as granted (the session store's own outage handling keeps the events).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gemma_mesh.common.logging import get_logger

log = get_logger(__name__)

DEFAULT_TTL_S = 5.0

# KEYS: holder, wanted. ARGV: me, ttl ms. -> false: granted; else the current holder.
_CLAIM_LUA = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
  return false
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return cur
"""

# KEYS: holder, wanted. ARGV: me, ttl ms. -> 1: still (or again) mine; 0: another holder, or a
# takeover is requested. An absent holder (lapsed during an outage, lost in a restart) is re-taken.
_KEEP_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
local wanted = redis.call('GET', KEYS[2])
if wanted and wanted ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: holder. ARGV: me.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class SessionLeases:
    """In-process leases (one gateway replica). ``RedisSessionLeases`` shares them across replicas.

    Args:
        ttl_s: a lease not refreshed for this long is free (a holder that died).
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self.refresh_s = ttl_s / 5
        self._holders: dict[str, tuple[str, float]] = {}
        self._wanted: dict[str, tuple[str, float]] = {}

    def _live(self, table: dict[str, tuple[str, float]], session_id: str) -> str | None:
        entry = table.get(session_id)
        if entry is None or entry[1] < time.monotonic():
            table.pop(session_id, None)
            return None
        return entry[0]

    async def claim(self, session_id: str, holder: str) -> str | None:
        """Take the lease -> None, or the current holder's id (a takeover is then requested)."""
        current = self._live(self._holders, session_id)
        expiry = time.monotonic() + self.ttl_s
        if current is None or current == holder:
            self._holders[session_id] = (holder, expiry)
            if self._live(self._wanted, session_id) == holder:
                del self._wanted[session_id]
            return None
        self._wanted[session_id] = (holder, expiry)
        return current

    async def keep(self, session_id: str, holder: str) -> bool:
        """Refresh the lease (re-take it if it lapsed unclaimed); False when another connection
        holds it or asked to take over."""
        current = self._live(self._holders, session_id)
        if current is not None and current != holder:
            return False
        wanted = self._live(self._wanted, session_id)
        if wanted is not None and wanted != holder:
            return False
        self._holders[session_id] = (holder, time.monotonic() + self.ttl_s)
        return True

    async def release(self, session_id: str, holder: str) -> None:
        """Give the lease up (no-op if another connection holds it)."""
        if self._live(self._holders, session_id) == holder:
            del self._holders[session_id]

    async def close(self) -> None:
        """Nothing to release in process."""


class RedisSessionLeases(SessionLeases):
    """Leases in Redis (keys ``P:session:{id}:holder`` and ``:wanted``), shared by every replica."""

    def __init__(self, url: str, *, prefix: str = "gemma-mesh", ttl_s: float = DEFAULT_TTL_S) -> None:
        super().__init__(ttl_s)
        self._prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._claim = self._redis.register_script(_CLAIM_LUA)
        self._keep = self._redis.register_script(_KEEP_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)

    def _keys(self, session_id: str) -> list[str]:
        base = f"{self._prefix}:session:{session_id}"
        return [f"{base}:holder", f"{base}:wanted"]

    async def _run(self, script: Any, keys: list[str], args: list[Any], default: Any) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as error:
            log.warning("session lease unavailable; proceeding without it", error=str(error))
            return default

    async def claim(self, session_id: str, holder: str) -> str | None:
        result = await self._run(self._claim, self._keys(session_id), [holder, int(self.ttl_s * 1000)], None)
        return result or None

    async def keep(self, session_id: str, holder: str) -> bool:
        return bool(await self._run(self._keep, self._keys(session_id), [holder, int(self.ttl_s * 1000)], 1))

    async def release(self, session_id: str, holder: str) -> None:
        await self._run(self._release, self._keys(session_id)[:1], [holder], 1)

    async def close(self) -> None:
        await self._redis.aclose()


def open_leases(
    redis_url: str | None, ttl_s: float = DEFAULT_TTL_S, *, prefix: str = "gemma-mesh"
) -> SessionLeases:
    """Redis leases (keys under ``prefix``) when a URL is given, else in-process ones."""
    return RedisSessionLeases(redis_url, prefix=prefix, ttl_s=ttl_s) if redis_url else SessionLeases(ttl_s)
