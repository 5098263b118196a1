"""Settings of the audio frontend (environment prefix ``GEMMA_MESH_AUDIO_``, e.g. ``GEMMA_MESH_AUDIO_PORT``).

The 30 s clip limit, the sample rate and the milliseconds per soft token are not settings: they come
from the bundle's manifest (``audio.max_samples``, ``audio.sampling_rate``, ``audio.ms_per_token``).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gemma_mesh.common.settings import GrpcServiceSettings


class AudioSettings(GrpcServiceSettings):
    """``gemma-mesh serve audio``: the shared gRPC settings plus the audio limits below."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_MESH_AUDIO_", extra="ignore")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    encode_threads: int = Field(2, ge=1, description="Worker threads that decode and encode audio")
    max_split_audio_s: float = Field(
        600.0, gt=0, description="Longest clip Encode accepts with split_long_audio (longer ones are refused)"
    )
    split_search_s: float = Field(
        5.0, gt=0, le=30, description="Seconds before the 30 s limit searched for the quietest point to cut"
    )
    max_streams: int = Field(
        256, ge=1, description="Concurrent EncodeStream calls; more are refused with RESOURCE_EXHAUSTED"
    )
    max_stream_s: float = Field(
        4 * 3600.0, gt=0, description="Longest audio one EncodeStream call may carry, in seconds"
    )
    max_stream_chunk_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest PCM chunk in one EncodeStream message"
    )
    stream_window_tokens: int = Field(
        375,
        ge=64,
        description="Longest encoder window per streaming step, in soft tokens (left context included)",
    )
    stream_rewind_ms: int = Field(
        5000,
        ge=0,
        description="How far before the end of the PCM sent an AudioStreamEnd may end a stream, in ms "
        "(the encoder keeps that much of its features to encode the tail again). At least the "
        "gateway's split_search_ms: a live caption segment split at its quietest point in its last "
        "5 s is then ended on its stream instead of being encoded whole again",
    )
    verify_streaming: bool = Field(
        True, description="Check at startup that incremental encoding equals whole-clip encoding"
    )
