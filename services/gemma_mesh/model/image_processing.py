"""Image decoding and Gemma 4 vision preprocessing in numpy and Pillow (no torch, no transformers).

`ImageProcessor.preprocess` reproduces ``transformers.Gemma4ImageProcessorPil`` (transformers 5.23)
exactly: transformers' ``convert_to_rgb`` (alpha composited onto white), an aspect-ratio-preserving
Pillow resize to a multiple of ``pooling_kernel_size * patch_size`` within the soft-token budget,
``uint8 * (1/255)`` in float64 cast to float32, row-major patches flattened as (row, col, channel),
(x, y) patch position ids, padding to ``max_soft_tokens * pooling_kernel_size**2`` patches with
zero pixels and -1 positions.

``transformers.Gemma4ImageProcessor`` (the torchvision backend, what ``AutoProcessor`` loads by
default) resizes uint8 tensors with torchvision's antialiased bicubic instead of Pillow's; the two
differ by a few uint8 levels at edges (see tests/model/test_image_processing.py for the measured
bound). Everything else is identical.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gemma_mesh.common.errors import InvalidRequest

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Container formats Pillow may report for the accepted inputs (phone JPEGs often open as "MPO").
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF"})

# Settings of transformers' image processors that Gemma 4 leaves off; refused when switched on.
_UNSUPPORTED_FLAGS = ("do_center_crop", "do_pad", "do_reduce_labels")


def get_aspect_ratio_preserving_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """Resized (height, width): the largest multiples of ``pooling_kernel_size * patch_size`` within
    ``max_patches`` patches, keeping the aspect ratio (port of transformers'
    ``gemma4.image_processing_pil_gemma4.get_aspect_ratio_preserving_size``, same edge cases:
    a side that would round to 0 becomes one ``side_mult`` and the other side is
    ``floor(long / short) * side_mult`` capped at ``max_patches // k**2 * side_mult``).

    Raises ValueError when no valid size exists.
    """
    total_px = height * width
    target_px = max_patches * (patch_size**2)
    factor = math.sqrt(target_px / total_px)
    ideal_height = factor * height
    ideal_width = factor * width
    side_mult = pooling_kernel_size * patch_size
    target_height = math.floor(ideal_height / side_mult) * side_mult
    target_width = math.floor(ideal_width / side_mult) * side_mult
    if target_height == 0 and target_width == 0:
        raise ValueError(f"image {height}x{width} would resize to 0x0")
    max_side_length = (max_patches // pooling_kernel_size**2) * side_mult
    if target_height == 0:
        target_height = side_mult
        target_width = min(math.floor(width / height) * side_mult, max_side_length)
    elif target_width == 0:
        target_width = side_mult
        target_height = min(math.floor(height / width) * side_mult, max_side_length)
    if target_height * target_width > target_px:
        raise ValueError(
            f"resizing {height}x{width} to {target_height}x{target_width} exceeds {max_patches} patches"
        )
    return target_height, target_width


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image`` with transparency composited onto white.

    Port of ``transformers.image_transforms.convert_to_rgb`` for Pillow images.

    Any image with an ``A`` band (RGBA, LA, PA) or a ``transparency`` entry (palette or
    single-colour transparency) is converted to RGBA and alpha-composited over opaque white; every
    other mode (L, P, CMYK, YCbCr, I;16, ...) goes through Pillow's ``convert("RGB")``.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class PreprocessedImage:
    """One image ready for the vision encoder.

    Attributes:
        pixel_values: float32 ``[max_patches, patch_size * patch_size * 3]`` in [0, 1], each row a
            patch flattened as (row in patch, column in patch, RGB channel); rows after the real
            patches are zero. ``max_patches = max_soft_tokens * pooling_kernel_size**2``.
        position_ids: int64 ``[max_patches, 2]``, (x, y) = (patch column, patch row), -1 for padding.
        num_soft_tokens: soft tokens the encoder produces (real patches / pooling_kernel_size**2).
        resized_size: (height, width) in pixels after the resize.
    """

    pixel_values: np.ndarray
    position_ids: np.ndarray
    num_soft_tokens: int
    resized_size: tuple[int, int]


class ImageProcessor:
    """Gemma 4 image preprocessing; matches ``transformers.Gemma4ImageProcessorPil`` exactly.

    Args:
        settings: the checkpoint's image-processor dict (``Gemma4ImageProcessorPil().to_dict()``
            keys: patch_size, max_soft_tokens, pooling_kernel_size, resample, do_rescale,
            rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb, do_resize); other
            keys (``image_processor_type``, ``size``: None, ...) are ignored.
        max_image_pixels: decompression-bomb limit (width * height) checked from the header before
            any pixel is decoded, and again in `preprocess`.
    """

    def __init__(
        self, settings: dict[str, Any] | None = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ):
        s = dict(settings or {})
        switched_on = [flag for flag in _UNSUPPORTED_FLAGS if s.get(flag)]
        if switched_on:
            raise ValueError(f"unsupported image-processor settings switched on: {switched_on}")
        if not s.get("do_resize", True) or not s.get("do_convert_rgb", True):
            raise ValueError("do_resize=False and do_convert_rgb=False are not supported (Gemma 4 uses both)")
        self.patch_size = int(s.get("patch_size", 16))
        self.pooling_kernel_size = int(s.get("pooling_kernel_size", 3))
        self.max_soft_tokens = int(s.get("max_soft_tokens", 280))
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(
                f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}"
            )
        self.resample = Image.Resampling(int(s.get("resample", Image.Resampling.BICUBIC)))
        self.do_rescale = bool(s.get("do_rescale", True))
        self.rescale_factor = float(s.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(s.get("do_normalize", False))
        self.image_mean = np.array(s.get("image_mean", (0.0, 0.0, 0.0)), dtype=np.float32).reshape(3)
        self.image_std = np.array(s.get("image_std", (1.0, 1.0, 1.0)), dtype=np.float32).reshape(3)
        self.max_image_pixels = int(max_image_pixels)

    @classmethod
    def from_settings(
        cls, d: dict[str, Any], *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> ImageProcessor:
        """Build from a checkpoint's image-processor dict (see the class docstring)."""
        return cls(d, max_image_pixels=max_image_pixels)

    # ------------------------------------------------------------------------------- decoding
    def decode_image(self, data: bytes) -> Image.Image:
        """Decode JPEG / PNG / WebP / GIF (first frame) bytes and apply the EXIF orientation.

        The pixel count is checked from the header before any pixel is decoded. The returned image
        keeps its mode (e.g. RGBA, P, L, CMYK); `preprocess` converts it to RGB.

        Raises:
            InvalidRequest: empty, unrecognised, unsupported-format, zero-size, corrupt or truncated
                data, or more than ``max_image_pixels`` pixels.
        """
        if not data:
            raise InvalidRequest("image data is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise InvalidRequest(
                f"image is larger than the limit of {self.max_image_pixels} pixels (Pillow: {exc})"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidRequest(
                "image data is not a readable image (accepted: JPEG, PNG, WebP, GIF)"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidRequest(
                f"image data is not a readable image (accepted: JPEG, PNG, WebP, GIF): {exc}"
            ) from exc
        if image.format not in ACCEPTED_FORMATS:
            raise InvalidRequest(
                f"image format {image.format} is not accepted (accepted: JPEG, PNG, WebP, GIF)"
            )
        self._check_size(*image.size)
        try:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
            raise InvalidRequest(f"image data is corrupt or truncated: {exc}") from exc
        return image

    def _check_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidRequest(f"image has zero size ({width}x{height} pixels)")
        if width * height > self.max_image_pixels:
            raise InvalidRequest(
                f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{self.max_image_pixels} pixels"
            )

    # -------------------------------------------------------------------------- preprocessing
    def _budget(self, max_soft_tokens: int | None) -> int:
        budget = self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens
        if budget not in SUPPORTED_SOFT_TOKENS:
            raise InvalidRequest(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {budget}")
        return budget

    def target_size(self, height: int, width: int, max_soft_tokens: int | None = None) -> tuple[int, int]:
        """(height, width) an image of ``height x width`` pixels is resized to for the budget."""
        budget = self._budget(max_soft_tokens)
        if height <= 0 or width <= 0:
            raise InvalidRequest(f"image has zero size ({width}x{height} pixels)")
        try:
            return get_aspect_ratio_preserving_size(
                height, width, self.patch_size, budget * self.pooling_kernel_size**2, self.pooling_kernel_size
            )
        except ValueError as exc:
            raise InvalidRequest(f"image of {width}x{height} pixels cannot be fitted: {exc}") from exc

    def num_soft_tokens(self, height: int, width: int, max_soft_tokens: int | None = None) -> int:
        """Soft tokens for an image of ``height x width`` pixels (Gemma4Processor's image count)."""
        th, tw = self.target_size(height, width, max_soft_tokens)
        return (th // self.patch_size) * (tw // self.patch_size) // self.pooling_kernel_size**2

    def preprocess(self, image: Image.Image, max_soft_tokens: int | None = None) -> PreprocessedImage:
        """Resize, rescale and patchify one image (see `PreprocessedImage` for shapes).

        Args:
            image: any-mode Pillow image (EXIF orientation already applied, as `decode_image` does).
            max_soft_tokens: budget, one of 70/140/280/560/1120; defaults to the settings' value.

        Raises:
            InvalidRequest: unknown budget, zero-size or too many pixels.
        """
        budget = self._budget(max_soft_tokens)
        width, height = image.size
        self._check_size(width, height)
        th, tw = self.target_size(height, width, budget)
        rgb = convert_to_rgb(image)
        if (th, tw) != (height, width):
            rgb = rgb.resize((tw, th), resample=self.resample)
        pixels = np.asarray(rgb)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = (pixels.astype(np.float32, copy=False) - self.image_mean) / self.image_std
        pixels = pixels.astype(np.float32, copy=False)

        p = self.patch_size
        ph, pw = th // p, tw // p
        patches = pixels.reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, p * p * 3)
        max_patches = budget * self.pooling_kernel_size**2
        pixel_values = np.zeros((max_patches, p * p * 3), dtype=np.float32)
        pixel_values[: ph * pw] = patches
        position_ids = np.full((max_patches, 2), -1, dtype=np.int64)
        grid_x, grid_y = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
        position_ids[: ph * pw] = np.stack([grid_x, grid_y], axis=-1).reshape(ph * pw, 2)
        return PreprocessedImage(
            pixel_values=pixel_values,
            position_ids=position_ids,
            num_soft_tokens=ph * pw // self.pooling_kernel_size**2,
            resized_size=(th, tw),
        )
