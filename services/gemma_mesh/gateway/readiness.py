"""The gateway's readiness: which capabilities it can serve now, from its dependencies' health.

A gateway is ready while it can serve something: losing the vision encoder costs frame analysis
and images, not audio captions or text chat; a Redis blip costs live sessions for a moment, not
the OpenAI API. Only the decoder is needed by every capability, so only its loss makes the
gateway unready (503). ``/readyz`` reports the capabilities lost (``degraded``).

``CAPABILITIES`` maps each capability to the dependencies it needs; ``capabilities(up)`` is pure.
``check_dependencies`` runs every check at once, each bounded by ``timeout_s``, so a readiness
answer takes one timeout at most, not the sum of them (the kubelet's probe timeout is 3 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

# capability -> dependencies it needs (backends by name, "store" = the session store).
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "chat": ("decoder",),  # /v1/chat/completions with text
    "chat_images": ("decoder", "vision"),  # image parts in chat completions
    "transcriptions": ("decoder", "audio"),  # /v1/audio/transcriptions, audio parts in chat
    "live_captions": ("decoder", "audio", "store"),  # /v1/stream audio
    "live_frames": ("decoder", "vision", "store"),  # /v1/stream camera frames
}


def capabilities(up: Mapping[str, bool]) -> dict[str, bool]:
    """``{capability: available}`` given ``{dependency: up}`` (a missing dependency is down)."""
    return {name: all(up.get(dep, False) for dep in deps) for name, deps in CAPABILITIES.items()}


@dataclass
class Readiness:
    """One readiness answer: ready when any capability is available."""

    dependencies: dict[str, bool]
    store_latency_s: float | None

    @property
    def capabilities(self) -> dict[str, bool]:
        return capabilities(self.dependencies)

    @property
    def ready(self) -> bool:
        return any(self.capabilities.values())

    def body(self) -> dict[str, Any]:
        """The JSON of ``/readyz``."""
        caps = self.capabilities
        backends = {k: v for k, v in self.dependencies.items() if k != "store"}
        return {
            "ready": self.ready,
            "degraded": sorted(name for name, ok in caps.items() if not ok),
            "capabilities": caps,
            "backends": backends,
            "store": {"ok": self.dependencies.get("store", False), "latency_s": self.store_latency_s},
        }


async def _bounded(check: Awaitable[Any], timeout_s: float) -> tuple[bool, float | None]:
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(check, timeout=timeout_s)
    except Exception:
        return False, None
    if result is False:
        return False, None
    return True, time.monotonic() - started


async def check_dependencies(
    backends: Mapping[str, Awaitable[bool]], store_ping: Awaitable[Any], timeout_s: float
) -> Readiness:
    """Await every backend check (True = SERVING) and the store ping together, each cut off after
    ``timeout_s`` (a timeout or an error counts as down)."""
    names = [*backends, "store"]
    results = await asyncio.gather(
        *(_bounded(check, timeout_s) for check in backends.values()), _bounded(store_ping, timeout_s)
    )
    up = {name: ok for name, (ok, _) in zip(names, results, strict=True)}
    return Readiness(up, results[-1][1])
