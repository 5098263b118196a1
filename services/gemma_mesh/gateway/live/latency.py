"""The gateway's recent partial-caption latency, across its sessions, against the latency objective.

Every session's caption pipeline reports the partial latency of each audio chunk it covers (arrival
at the gateway -> the first partial caption covering it, the ``caption_partial_latency`` metric's
samples). Camera-frame analyses are best effort: they start only while captions meet their
objective, because one session's analyses take decoder steps and CPU from every session's captions
(``FramePipeline``'s ``captions_behind``). Pure: no sockets, the clock is injected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

# Latencies older than this are forgotten: the decision follows the load of the last few seconds.
WINDOW_S = 5.0
# The quantile held to the objective (the bench and the alert rules speak of the p95).
QUANTILE = 0.95
# Fewer samples than this in the window say nothing yet (a quiet gateway is never "behind").
MIN_SAMPLES = 20
# Frame analyses stop once the recent p95 passes this fraction of the objective, not the objective
# itself: an analysis started now loads the decoder for the next second or two, and the window
# shows its effect only afterwards, so best-effort work must back off before captions miss.
HEADROOM = 0.8


class CaptionLatencyMonitor:
    """Sliding window of partial-caption latencies (seconds) from all sessions of one gateway.

    Args:
        target_s: the objective for the ``QUANTILE`` of partial latency (``caption_latency_target_ms``).
        window_s: how far back samples count.
        clock: monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        target_s: float,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_s = target_s
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()  # (observed at, latency_s)

    def observe(self, latency_s: float) -> None:
        """Record one chunk's partial latency, in seconds."""
        now = self._clock()
        self._samples.append((now, latency_s))
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def recent(self, quantile: float = QUANTILE) -> float | None:
        """The ``quantile`` of the latencies observed in the last ``window_s``; None with too few samples."""
        self._forget(self._clock())
        if len(self._samples) < MIN_SAMPLES:
            return None
        return float(np.quantile([latency for _, latency in self._samples], quantile))

    def over_target(self) -> bool:
        """True while the recent p95 partial latency is past ``HEADROOM`` of ``target_s`` (frame
        analyses then wait)."""
        recent = self.recent()
        return recent is not None and recent > HEADROOM * self.target_s
