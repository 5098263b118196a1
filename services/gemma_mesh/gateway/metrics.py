"""Prometheus metrics of the gateway (served at ``/metrics`` on its HTTP port).

Names are the contract of ``deploy/prometheus`` alert rules and the Grafana dashboard.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class GatewayMetrics:
    """All gateway metrics on one registry (a fresh one per app, so tests can run several apps)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge(
            "gemma_mesh_gateway_active_sessions", "Open /v1/stream WebSocket sessions", registry=r
        )
        self.audio_seconds = Counter(
            "gemma_mesh_gateway_audio_seconds", "Seconds of live audio received", registry=r
        )
        self.partial_latency = Histogram(
            "gemma_mesh_gateway_caption_partial_latency_seconds",
            "Audio arrival to the partial caption (or translation) that first covers it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.final_latency = Histogram(
            "gemma_mesh_gateway_caption_final_latency_seconds",
            "Segment end (VAD close) to its final caption (or translation)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.frames_received = Counter(
            "gemma_mesh_gateway_frames_received", "Camera frames received", registry=r
        )
        self.frames_dropped = Counter(
            "gemma_mesh_gateway_frames_dropped",
            "Camera frames replaced by a newer one before analysis, or over max_fps",
            registry=r,
        )
        self.frames_analysed = Counter(
            "gemma_mesh_gateway_frames_analysed", "Camera frames analysed", registry=r
        )
        self.warnings = Counter(
            "gemma_mesh_gateway_warnings", "Warning events sent, by code", ["code"], registry=r
        )
        self.errors = Counter(
            "gemma_mesh_gateway_errors", "Error events and HTTP errors, by code", ["code"], registry=r
        )
        self.redis_latency = Histogram(
            "gemma_mesh_gateway_redis_latency_seconds",
            "Session store operation latency",
            ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.capability_up = Gauge(
            "gemma_mesh_gateway_capability_up",
            "1 when the capability's backends and store answered the last /readyz (gateway.readiness)",
            ["capability"],
            registry=r,
        )
        self.redis_up = Gauge(
            "gemma_mesh_gateway_redis_up", "1 when the session store is reachable", registry=r
        )
        self.http_requests = Counter(
            "gemma_mesh_gateway_http_requests", "HTTP API requests", ["route", "status"], registry=r
        )
        self.tokens_generated = Counter(
            "gemma_mesh_gateway_generated_tokens", "Tokens generated for sessions and the API", registry=r
        )

    def observe_store(self, op: str, seconds: float, ok: bool) -> None:
        """The session store's per-operation hook."""
        self.redis_latency.labels(op).observe(seconds)
        self.redis_up.set(1 if ok else 0)
