"""Decoder service settings (environment prefix ``GEMMA_MESH_DECODER_``; Helm ``decoder.*`` values)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gemma_mesh.common.settings import GrpcServiceSettings, MiB


class DecoderSettings(GrpcServiceSettings):
    """Limits and sizes of the decoder engine, on top of the shared gRPC settings."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_MESH_DECODER_", extra="ignore")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one step")
    max_queue_size: int = Field(
        64, ge=0, description="Requests waiting for a slot; more get RESOURCE_EXHAUSTED"
    )
    prefill_chunk_tokens: int = Field(
        256, ge=1, description="Prompt tokens per prefill call; decode steps of other requests run in between"
    )
    prefix_cache_bytes: int = Field(
        256 * MiB, ge=0, description="KV bytes kept for prompt-prefix reuse (0 = off)"
    )
    prefix_block_tokens: int = Field(16, ge=1, description="Granularity of cached prefix lengths, in tokens")
    kv_initial_tokens: int = Field(
        256, ge=1, description="Initial KV capacity per sequence (doubles on demand)"
    )
    max_context_tokens: int = Field(
        0, ge=0, description="Prompt + max_tokens limit; 0 = the model's max_position_embeddings"
    )
    kv_storage: Literal["auto", "host", "device"] = Field(
        "auto",
        description=(
            "Where the KV cache lives: 'device' = OrtValues on the decoder's device, updated in place "
            "by ONNX graphs (no host<->device copies per step); 'host' = numpy arrays; 'auto' = device "
            "when the decoder runs on a GPU provider, else host"
        ),
    )
    max_stop_strings: int = Field(16, ge=0, description="Stop strings per request")
    prediction_block_tokens: int = Field(
        16,
        ge=1,
        description="Predicted-output tokens verified per prefill run: the next block is verified only "
        "if the whole block was accepted, so a prediction that goes wrong early costs at most one block",
    )
    max_constraint_chars: int = Field(
        256 * 1024, ge=0, description="Largest constraint text (JSON schema, regex or grammar), in characters"
    )
    grammar_cache_size: int = Field(
        64,
        ge=0,
        description="Compiled constraints kept for reuse, keyed by their text (0 = compile every time)",
    )
    grammar_threads: int = Field(
        0, ge=0, description="llguidance threads computing the batch's token masks (0 = llguidance's default)"
    )
    grammar_json_whitespace_flexible: bool = Field(
        False,
        description="JSON schemas allow any whitespace between tokens (llguidance's default) instead of the "
        "compact form; off, a model cannot spend max_tokens on whitespace (vLLM's disable_any_whitespace)",
    )
    thinking_budget_low: int = Field(
        256,
        ge=0,
        description="Thought tokens for reasoning_effort 'low' (then the thought channel is closed)",
    )
    thinking_budget_medium: int = Field(
        1024, ge=0, description="Thought tokens for reasoning_effort 'medium'"
    )
    thinking_budget_high: int = Field(4096, ge=0, description="Thought tokens for reasoning_effort 'high'")
    max_grammar_size: int = Field(
        500_000, ge=1, description="llguidance's grammar size limit (symbols); larger constraints are refused"
    )
    unhealthy_after_failed_steps: int = Field(
        3,
        ge=1,
        description="Engine steps failing in a row after which the decoder reports NOT_SERVING on readiness "
        "and liveness (a broken ONNX Runtime session fails every step; the kubelet then restarts the pod)",
    )
