"""Readiness and liveness of a gRPC service, both over ``grpc.health.v1`` (what Kubernetes' gRPC probes ask).

Two questions, two answers:

- **Readiness** (service ``""`` and each service's full name): SERVING only once every graph the
  service needs is loaded and has run once, and only while its engine works and it is not
  draining. A loading, broken or draining pod gets no calls (Kubernetes drops it from the headless
  Service's addresses; the gateway's ``/readyz`` reports the capability as lost).
- **Liveness** (service ``LIVENESS_SERVICE``): SERVING while the process can still serve, loading
  and draining included (the startup probe covers a slow load); NOT_SERVING once the engine is
  broken (its scheduler thread died, or ``unhealthy_after_failed_steps`` engine steps in a row
  raised), which only a restart cures. It is never set back: the kubelet restarts the container.

grpc's ``HealthServicer`` starts with ``""`` = SERVING (grpc/grpc ``health.py``); ``ServiceHealth``
sets every name NOT_SERVING before the port opens. The engine reports from its own thread
(``engine_broken``), so the status change is posted to the server's event loop.

``FailedStepStreak`` is the pure counter behind "broken": N failures in a row, a success resets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from gemma_mesh.common.logging import get_logger

log = get_logger("health")

# The grpc.health.v1 service name liveness probes ask for (``livenessProbe.grpc.service``).
LIVENESS_SERVICE = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FailedStepStreak:
    """Counts engine steps that raised in a row; ``broken`` once ``threshold`` of them did.

    ``record(ok)`` returns True exactly once: on the failure that makes the streak reach
    ``threshold`` (so the caller reports it once). A successful step resets the count, but not
    ``broken``: a pod whose session failed that often is restarted, not trusted again.
    """

    def __init__(self, threshold: int) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self.count = 0
        self.broken = False

    def record(self, ok: bool) -> bool:
        if ok:
            self.count = 0
            return False
        self.count += 1
        if self.count >= self.threshold and not self.broken:
            self.broken = True
            return True
        return False


class ServiceHealth:
    """The health statuses of one server: readiness for ``names`` and ``""``, liveness apart.

    Args:
        servicer: the server's ``grpc_health`` asyncio servicer.
        names: full names of the services this server registers (``gemma_mesh.v1.Decoder``...).
    """

    def __init__(self, servicer: health.aio.HealthServicer, names: Sequence[str]) -> None:
        self.servicer = servicer
        self.names = [*names, ""]
        self.reason = "loading"
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _set_readiness(self, status: int) -> None:
        for name in self.names:
            await self.servicer.set(name, status)

    async def loading(self) -> None:
        """Not ready, alive: call before the port opens (grpc starts ``""`` as SERVING)."""
        self._loop = asyncio.get_running_loop()
        await self._set_readiness(NOT_SERVING)
        await self.servicer.set(LIVENESS_SERVICE, SERVING)

    async def serving(self) -> None:
        """Ready: every graph is loaded and warmed (no-op once broken or draining)."""
        if self.reason in ("broken", "draining"):
            return
        self._loop = asyncio.get_running_loop()
        self.reason = "serving"
        await self._set_readiness(SERVING)

    async def broken(self, why: str) -> None:
        """Neither ready nor alive, for good: the engine cannot serve (``why`` is logged)."""
        self.reason = "broken"
        log.error("engine broken: not ready, not live", reason=why)
        await self._set_readiness(NOT_SERVING)
        await self.servicer.set(LIVENESS_SERVICE, NOT_SERVING)

    def engine_broken(self, why: str) -> None:
        """``broken(why)`` from any thread (the engine's): posted to the server's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.broken(why), loop)

    async def draining(self) -> None:
        """SIGTERM: not ready for good; liveness unchanged (a draining pod is not to be restarted)."""
        if self.reason != "broken":
            self.reason = "draining"
        await self._set_readiness(NOT_SERVING)
