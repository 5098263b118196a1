"""The vision encoder's logic, free of gRPC: image bytes / raw RGB / video in, soft tokens (numpy) out.

`VisionEngine` wraps a `ModelBundle`. ``prepare_*`` (worker threads) decode, apply the EXIF
orientation, convert any mode to RGB, check the pixel limit before decoding, and preprocess with the
request's soft-token budget into an `ImageJob`; ``encode(jobs)`` (the batcher's run) encodes jobs from
many requests in as few ONNX runs as their sizes allow. Errors are ``InvalidRequest`` values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.common.logging import get_logger
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.model.image_processing import ImageProcessor, PreprocessedImage
from gemma_mesh.model.video import decode_video, settings_from_processor
from gemma_mesh.vision.settings import VisionSettings

log = get_logger("vision")


@dataclass(frozen=True)
class ImageJob:
    """One preprocessed image or frame waiting for the encoder.

    Attributes:
        image: pixels and positions for the encoder (see ``PreprocessedImage``).
        width / height: the decoded image's size in pixels (after the EXIF orientation).
        timestamp_s: media time passed through (camera frames, video frames).
    """

    image: PreprocessedImage
    width: int
    height: int
    timestamp_s: float = 0.0


@dataclass(frozen=True)
class EncodedImage:
    """Soft tokens ``[n, H]`` (the bundle's float dtype) of one `ImageJob`, with its size and time."""

    tokens: np.ndarray
    width: int
    height: int
    timestamp_s: float


class VisionEngine:
    """Decoding, budgets, limits and batched encoding on one bundle.

    Args:
        bundle: a bundle with a ``vision_encoder`` graph.
        settings: the service's `VisionSettings`.

    Raises:
        ValueError: the bundle has no vision encoder or unsupported image-processor settings.
    """

    def __init__(self, bundle: ModelBundle, settings: VisionSettings) -> None:
        if "vision_encoder" not in bundle.manifest.graphs:
            raise ValueError(f"bundle {bundle.path} has no vision_encoder graph")
        self.bundle = bundle
        self.settings = settings
        vision = bundle.manifest.vision
        self.supported_budgets = tuple(vision.supported_soft_tokens)
        self.default_budget = vision.default_max_soft_tokens
        self.processor = ImageProcessor.from_settings(
            bundle.settings.get("image_processor", {}), max_image_pixels=settings.max_image_pixels
        )
        video_config = bundle.settings.get("video_processor", {})
        self.video_defaults, self.frame_processor = settings_from_processor(
            video_config,
            num_frames=min(
                bundle.manifest.video.num_frames or int(video_config.get("num_frames", 32)),
                settings.max_video_frames,
            ),
            fps=None,
            max_soft_tokens=bundle.manifest.video.max_soft_tokens_per_frame,
            max_frames=settings.max_video_frames,
            max_duration_s=settings.max_video_duration_s,
            max_frame_pixels=settings.max_video_frame_pixels,
        )
        # Create the session and run it once now, not in the first request.
        self.encode([self.prepare_raw(b"\x80" * 48 * 48 * 3, 48, 48, 0)])

    # ----------------------------------------------------------------------------- checks
    def budget(self, requested: int, default: int, *, param: str = "max_soft_tokens") -> int:
        """``requested`` soft-token budget, or ``default`` for 0. Raises InvalidRequest for unknown ones."""
        budget = requested or default
        if budget not in self.supported_budgets:
            raise InvalidRequest(
                f"{param} must be one of {list(self.supported_budgets)} (or 0 for {default}), got {requested}",
                param=param,
            )
        return budget

    @staticmethod
    def _timestamp(value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise InvalidRequest(
                f"timestamp_s must be a finite number >= 0, got {value}", param="timestamp_s"
            )
        return float(value)

    # --------------------------------------------------------------------------- prepare
    def _job(
        self, image: Image.Image, budget: int, timestamp_s: float, processor: ImageProcessor
    ) -> ImageJob:
        width, height = image.size
        return ImageJob(processor.preprocess(image, budget), width, height, timestamp_s)

    def prepare_encoded(
        self, data: bytes, max_soft_tokens: int = 0, timestamp_s: float = 0.0, *, video_frame: bool = False
    ) -> ImageJob:
        """JPEG / PNG / WebP / GIF (first frame) bytes -> `ImageJob`.

        ``video_frame``: a camera frame, prepared as ``prepare_video`` prepares each sampled frame
        (the video processor's settings; budget 0 = its per-frame default, 70 soft tokens for Gemma
        4, as ``Gemma4VideoProcessor`` uses) instead of as a still image (default 280).

        Raises:
            InvalidRequest: unknown budget, bad timestamp, empty/corrupt/truncated data, an unaccepted
                format, or more than ``max_image_pixels`` pixels (checked from the header).
        """
        processor, budget = self._processor_and_budget(max_soft_tokens, video_frame)
        timestamp_s = self._timestamp(timestamp_s)
        return self._job(processor.decode_image(data), budget, timestamp_s, processor)

    def _processor_and_budget(self, max_soft_tokens: int, video_frame: bool) -> tuple[ImageProcessor, int]:
        if video_frame:
            return self.frame_processor, self.budget(max_soft_tokens, self.video_defaults.max_soft_tokens)
        return self.processor, self.budget(max_soft_tokens, self.default_budget)

    def prepare_raw(
        self,
        rgb: bytes,
        width: int,
        height: int,
        max_soft_tokens: int = 0,
        timestamp_s: float = 0.0,
        *,
        video_frame: bool = False,
    ) -> ImageJob:
        """Packed RGB (3 bytes per pixel, row-major) -> `ImageJob` (``video_frame`` as in ``prepare_encoded``).

        Raises:
            InvalidRequest: non-positive or too large a size, a byte count other than ``width*height*3``,
                unknown budget, bad timestamp.
        """
        processor, budget = self._processor_and_budget(max_soft_tokens, video_frame)
        timestamp_s = self._timestamp(timestamp_s)
        if width <= 0 or height <= 0:
            raise InvalidRequest(f"raw image has zero size ({width}x{height} pixels)", param="raw")
        if width * height > self.settings.max_image_pixels:
            raise InvalidRequest(
                f"raw image is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{self.settings.max_image_pixels} pixels",
                param="raw",
            )
        if len(rgb) != width * height * 3:
            raise InvalidRequest(
                f"raw image {width}x{height} needs {width * height * 3} RGB bytes, got {len(rgb)}",
                param="raw",
            )
        image = Image.frombytes("RGB", (width, height), rgb)
        return self._job(image, budget, timestamp_s, processor)

    def prepare_video(self, data: bytes, max_soft_tokens: int = 0, num_frames: int = 0) -> list[ImageJob]:
        """An encoded video -> one `ImageJob` per sampled frame (uniform sampling, ``timestamp_s`` set).

        Raises:
            InvalidRequest: unknown budget, ``num_frames`` outside ``[0, max_video_frames]``, or a video
                that ``model.video.decode_video`` refuses (empty, undecodable, too long, too large).
        """
        defaults = self.video_defaults
        budget = self.budget(max_soft_tokens, defaults.max_soft_tokens)
        if not 0 <= num_frames <= self.settings.max_video_frames:
            raise InvalidRequest(
                f"num_frames must be between 1 and {self.settings.max_video_frames} (0 = {defaults.num_frames}), "
                f"got {num_frames}",
                param="num_frames",
            )
        video = dataclasses.replace(
            defaults, num_frames=num_frames or defaults.num_frames, max_soft_tokens=budget
        )
        sampled = decode_video(data, video)
        return [
            self._job(frame, budget, self._timestamp(t), self.frame_processor)
            for frame, t in zip(sampled.frames, sampled.timestamps_s, strict=True)
        ]

    # ---------------------------------------------------------------------------- encode
    def encode(self, jobs: list[ImageJob]) -> list[EncodedImage]:
        """Encode jobs (any mix of budgets) with as few ONNX runs as the patch limit allows.

        Jobs are grouped by patch count (budget), so no image is padded to a larger budget; a group
        is split into runs of at most ``max_batch_patches`` patches.
        """
        out: list[EncodedImage | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.image.pixel_values.shape[0], []).append(i)
        for patches, idx in groups.items():
            per_run = max(1, self.settings.max_batch_patches // patches)
            for k in range(0, len(idx), per_run):
                part = idx[k : k + per_run]
                tokens = self.bundle.encode_images([jobs[i].image for i in part])
                for i, t in zip(part, tokens, strict=True):
                    j = jobs[i]
                    out[i] = EncodedImage(t, j.width, j.height, j.timestamp_s)
        return [o for o in out if o is not None]
