"""Prometheus metrics of the audio frontend (process-wide, on the default registry).

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``gemma_mesh_audio_seconds_total`` | counter | rpc | audio seconds encoded |
| ``gemma_mesh_audio_soft_tokens_total`` | counter | rpc | soft tokens produced |
| ``gemma_mesh_audio_real_time_factor`` | histogram | rpc | processing seconds / audio seconds, per call |
| ``gemma_mesh_audio_request_seconds`` | histogram | rpc | wall time per call (a stream: first message to last) |
| ``gemma_mesh_audio_stream_step_seconds`` | histogram | | encoder time per streaming step |
| ``gemma_mesh_audio_errors_total`` | counter | rpc, code | calls that ended with a gRPC status other than OK |
| ``gemma_mesh_audio_active_streams`` | gauge | | open EncodeStream calls |
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_RTF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

AUDIO_SECONDS = Counter("gemma_mesh_audio_seconds", "Audio seconds encoded", ["rpc"])
SOFT_TOKENS = Counter("gemma_mesh_audio_soft_tokens", "Audio soft tokens produced", ["rpc"])
REAL_TIME_FACTOR = Histogram(
    "gemma_mesh_audio_real_time_factor",
    "Processing seconds per audio second, per call",
    ["rpc"],
    buckets=_RTF_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "gemma_mesh_audio_request_seconds", "Wall time per call", ["rpc"], buckets=_LATENCY_BUCKETS_S
)
STREAM_STEP_SECONDS = Histogram(
    "gemma_mesh_audio_stream_step_seconds", "Encoder time per streaming step", buckets=_LATENCY_BUCKETS_S
)
ERRORS = Counter("gemma_mesh_audio_errors", "Calls that ended with an error status", ["rpc", "code"])
ACTIVE_STREAMS = Gauge("gemma_mesh_audio_active_streams", "Open EncodeStream calls")
