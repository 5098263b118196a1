"""Prometheus metrics of the vision encoder (process-wide, on the default registry).

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ``gemma_mesh_vision_images_total`` | counter | rpc | images and video frames encoded |
| ``gemma_mesh_vision_soft_tokens_total`` | counter | rpc | soft tokens produced |
| ``gemma_mesh_vision_request_seconds`` | histogram | rpc | wall time per call |
| ``gemma_mesh_vision_batch_size`` | histogram | | images per encoder batch (across requests) |
| ``gemma_mesh_vision_batch_wait_seconds`` | histogram | | queue wait of a batch's oldest image |
| ``gemma_mesh_vision_batch_run_seconds`` | histogram | | encoder time per batch |
| ``gemma_mesh_vision_queue_depth`` | gauge | | images waiting for the encoder |
| ``gemma_mesh_vision_errors_total`` | counter | rpc, code | calls that ended with a gRPC status other than OK |
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

IMAGES = Counter("gemma_mesh_vision_images", "Images and video frames encoded", ["rpc"])
SOFT_TOKENS = Counter("gemma_mesh_vision_soft_tokens", "Image soft tokens produced", ["rpc"])
REQUEST_SECONDS = Histogram(
    "gemma_mesh_vision_request_seconds", "Wall time per call", ["rpc"], buckets=_LATENCY_BUCKETS_S
)
BATCH_SIZE = Histogram("gemma_mesh_vision_batch_size", "Images per encoder batch", buckets=_BATCH_BUCKETS)
BATCH_WAIT_SECONDS = Histogram(
    "gemma_mesh_vision_batch_wait_seconds", "Queue wait of a batch's oldest image", buckets=_LATENCY_BUCKETS_S
)
BATCH_RUN_SECONDS = Histogram(
    "gemma_mesh_vision_batch_run_seconds", "Encoder time per batch", buckets=_LATENCY_BUCKETS_S
)
QUEUE_DEPTH = Gauge("gemma_mesh_vision_queue_depth", "Images waiting for the encoder")
ERRORS = Counter("gemma_mesh_vision_errors", "Calls that ended with an error status", ["rpc", "code"])
