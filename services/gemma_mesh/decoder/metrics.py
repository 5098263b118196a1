"""Prometheus metrics of the decoder (one registry per engine, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecoderMetrics:
    """TTFT, inter-token latency, token counters, batch size, queue depth, prefix-cache hits, KV bytes,
    accepted and rejected predicted-output tokens."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "gemma_mesh_decoder_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token = Histogram(
            "gemma_mesh_decoder_inter_token_latency_seconds",
            "Time between tokens of one request",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gemma_mesh_decoder_prompt_tokens", "Prompt tokens prefilled or reused", registry=r
        )
        self.generated_tokens = Counter("gemma_mesh_decoder_generated_tokens", "Tokens generated", registry=r)
        self.cached_prompt_tokens = Counter(
            "gemma_mesh_decoder_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.batch_size = Histogram(
            "gemma_mesh_decoder_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("gemma_mesh_decoder_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge(
            "gemma_mesh_decoder_active_sequences", "Sequences being prefilled or decoded", registry=r
        )
        self.prefix_hit_ratio = Gauge(
            "gemma_mesh_decoder_prefix_cache_hit_ratio", "Prefix-cache hits over lookups", registry=r
        )
        self.prefix_cache_bytes = Gauge(
            "gemma_mesh_decoder_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r
        )
        self.kv_cache_bytes = Gauge(
            "gemma_mesh_decoder_kv_cache_bytes", "Bytes allocated for the batch KV cache", registry=r
        )
        self.prediction_tokens = Counter(
            "gemma_mesh_decoder_prediction_tokens",
            "Predicted-output tokens by outcome: accepted (generated in the prefill run) or rejected",
            ["outcome"],
            registry=r,
        )
        self.requests = Counter(
            "gemma_mesh_decoder_requests", "Finished requests by outcome", ["outcome"], registry=r
        )
        self.failed_steps = Counter(
            "gemma_mesh_decoder_failed_steps",
            "Engine steps (prefill or decode runs) that raised; each fails the requests it ran",
            registry=r,
        )
        self.errors = Counter(
            "gemma_mesh_decoder_errors", "Refused or failed requests by status code", ["code"], registry=r
        )
