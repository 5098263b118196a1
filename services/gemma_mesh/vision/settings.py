"""Settings of the vision encoder (environment prefix ``GEMMA_MESH_VISION_``, e.g. ``GEMMA_MESH_VISION_PORT``).

Patch size, pooling, the supported soft-token budgets and their default (280), and the per-frame video
budget (70) are not settings: they come from the bundle's manifest.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gemma_mesh.common.settings import GrpcServiceSettings
from gemma_mesh.model.image_processing import DEFAULT_MAX_IMAGE_PIXELS
from gemma_mesh.model.video import MAX_FRAME_PIXELS, MAX_VIDEO_DURATION_S, MAX_VIDEO_FRAMES


class VisionSettings(GrpcServiceSettings):
    """``gemma-mesh serve vision``: the shared gRPC settings plus the vision limits below."""

    model_config = SettingsConfigDict(env_prefix="GEMMA_MESH_VISION_", extra="ignore")

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    encode_threads: int = Field(2, ge=1, description="Worker threads that decode and preprocess images")
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Largest image (width x height, from the header, before decoding): decompression bombs",
    )
    max_images_per_request: int = Field(64, ge=1, description="Most images in one EncodeBatch call")
    max_batch_size: int = Field(32, ge=1, description="Most images in one encoder run (across requests)")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="Longest a queued image waits for others to share its encoder run"
    )
    max_batch_patches: int = Field(
        32 * 2520, ge=1, description="Most patches in one encoder run (280-token images have 2520)"
    )
    max_queue_images: int = Field(
        1024, ge=1, description="Images waiting for the encoder; more are refused with RESOURCE_EXHAUSTED"
    )
    max_video_frames: int = Field(MAX_VIDEO_FRAMES, ge=1, description="Most frames EncodeVideo samples")
    max_video_duration_s: float = Field(MAX_VIDEO_DURATION_S, gt=0, description="Longest video accepted")
    max_video_frame_pixels: int = Field(MAX_FRAME_PIXELS, ge=1, description="Largest video frame accepted")
