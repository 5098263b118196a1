"""ImageProcessor vs transformers' Gemma4ImageProcessorPil (exact) and Gemma4ImageProcessor (torchvision)."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data
from transformers import Gemma4ImageProcessor, Gemma4ImageProcessorPil
from transformers.image_utils import load_image
from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size as hf_target_size

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.image_processing import SUPPORTED_SOFT_TOKENS, ImageProcessor, convert_to_rgb

# Gemma4ImageProcessor (torchvision) vs Pillow, both resizing uint8 with antialiased bicubic and
# rounding to uint8. Measured over every image and budget below (differences in levels of 1/255):
# - natural photos in any mode: max 2 levels, mean <= 5e-5 (fixed-point weights / rounding differ);
# - dithered palette images at budget 70 (300x451 -> 288x480: one axis shrinks, the other grows):
#   max 6 levels (P) and 29 levels (P with transparency, white dots), mean <= 9.1e-4, 99th
#   percentile 1 level. There Pillow runs the vertical pass first and torchvision the horizontal one,
#   and the clipped uint8 intermediate cuts bicubic overshoot at hard edges differently (a two-step
#   Pillow resize in torchvision's order agrees with torchvision within 2 levels).
# The bounds keep one level (photos) or ~10% (the rest) of headroom over those measurements.
LEVEL = 1 / 255
PHOTO_MAX_ABS = 3 * LEVEL + 1e-6
ANY_MAX_ABS = 32 * LEVEL
ANY_P99_ABS = 1 * LEVEL + 1e-6
ANY_MEAN_ABS = 1e-3
ANY_FRACTION_OVER_2_LEVELS = 1e-2
DITHERED = {"palette-P", "P-transparency"}


def _photo(name: str, height: int | None = None, width: int | None = None) -> Image.Image:
    image = Image.fromarray(getattr(data, name)())
    return image if height is None else image.resize((width, height), Image.Resampling.BICUBIC)


def _rgba() -> Image.Image:
    rgb = data.astronaut()
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def _gif_with_transparency() -> Image.Image:
    buf = io.BytesIO()
    _photo("chelsea").convert("P").save(buf, "GIF", transparency=0)
    return Image.open(io.BytesIO(buf.getvalue()))


IMAGES = {
    "square-512": lambda: _photo("astronaut"),
    "16:9": lambda: _photo("coffee", 720, 1280),
    "9:16": lambda: _photo("chelsea", 1280, 720),
    "h3xw900": lambda: _photo("astronaut", 3, 900),
    "h900xw3": lambda: _photo("astronaut", 900, 3),
    "h4000xw3000": lambda: _photo("coffee", 4000, 3000),
    "exact-fit-768": lambda: _photo("astronaut", 768, 768),  # already the target size: no resize
    "grayscale-L": lambda: Image.fromarray(data.camera()),
    "LA": lambda: _rgba().convert("LA"),
    "RGBA": _rgba,
    "palette-P": lambda: _photo("chelsea").convert("P"),
    "P-transparency": _gif_with_transparency,
    "CMYK": lambda: _photo("coffee").convert("CMYK"),
}


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: make() for name, make in IMAGES.items()}


@pytest.fixture(scope="module")
def ref_pil() -> Gemma4ImageProcessorPil:
    return Gemma4ImageProcessorPil()


@pytest.fixture(scope="module")
def ref_tv() -> Gemma4ImageProcessor:
    return Gemma4ImageProcessor()


@pytest.fixture(scope="module")
def processor(ref_pil) -> ImageProcessor:
    return ImageProcessor.from_settings(ref_pil.to_dict())


@pytest.mark.parametrize("budget", SUPPORTED_SOFT_TOKENS)
@pytest.mark.parametrize("name", list(IMAGES))
def test_matches_transformers_both_backends(name, budget, images, processor, ref_pil, ref_tv):
    image = images[name]
    ours = processor.preprocess(image, budget)
    max_patches = budget * 9
    assert ours.pixel_values.shape == (max_patches, 768) and ours.pixel_values.dtype == np.float32
    assert ours.position_ids.shape == (max_patches, 2) and ours.position_ids.dtype == np.int64

    pil = ref_pil(image, max_soft_tokens=budget, return_tensors="np")
    assert ours.num_soft_tokens == pil["num_soft_tokens_per_image"][0]
    np.testing.assert_array_equal(ours.position_ids, pil["image_position_ids"][0])
    np.testing.assert_array_equal(ours.pixel_values, pil["pixel_values"][0])  # bit-exact (<= 1e-6 required)

    tv = ref_tv(image, max_soft_tokens=budget, return_tensors="np")
    assert ours.num_soft_tokens == tv["num_soft_tokens_per_image"][0]
    np.testing.assert_array_equal(ours.position_ids, tv["image_position_ids"][0])
    real = ours.num_soft_tokens * 9
    diff = np.abs(ours.pixel_values - tv["pixel_values"][0])
    assert not diff[real:].any()
    diff = diff[:real]
    assert diff.max() <= (ANY_MAX_ABS if name in DITHERED else PHOTO_MAX_ABS)
    assert np.quantile(diff, 0.99) <= ANY_P99_ABS and diff.mean() <= ANY_MEAN_ABS
    assert (diff > 2.5 * LEVEL).mean() <= ANY_FRACTION_OVER_2_LEVELS

    th, tw = ours.resized_size
    assert real == (th // 16) * (tw // 16) and th % 48 == 0 and tw % 48 == 0
    assert (ours.position_ids[real:] == -1).all() and not ours.pixel_values[real:].any()
    assert ours.position_ids[:real].min() == 0 and ours.pixel_values[:real].max() <= 1.0
    assert ours.num_soft_tokens == processor.num_soft_tokens(image.height, image.width, budget)


def test_patch_layout_and_positions(processor):
    # 288x528 is already the budget-70 size: no resize, 18x33 patches. Patch (row 1, col 4) holds
    # pixel rows 16..31, cols 64..79, flattened as (row, col, channel).
    pixels = np.random.default_rng(0).integers(0, 256, (288, 528, 3), dtype=np.uint8)
    out = processor.preprocess(Image.fromarray(pixels), 70)
    assert out.resized_size == (288, 528) and out.num_soft_tokens == 18 * 33 // 9
    patch = out.pixel_values[1 * 33 + 4].reshape(16, 16, 3)
    np.testing.assert_array_equal(patch, (pixels[16:32, 64:80].astype(np.float64) / 255).astype(np.float32))
    assert out.position_ids[1 * 33 + 4].tolist() == [4, 1]  # (x, y)
    assert out.position_ids[: 18 * 33].tolist() == [[x, y] for y in range(18) for x in range(33)]


def test_num_soft_tokens_matches_transformers_grid(processor):
    for (h, w), budget in itertools.product(
        [
            (1, 1),
            (3, 900),
            (900, 3),
            (47, 47),
            (480, 640),
            (1080, 1920),
            (3000, 4000),
            (1, 10_000),
            (7, 5000),
        ],
        SUPPORTED_SOFT_TOKENS,
    ):
        th, tw = hf_target_size(h, w, 16, budget * 9, 3)
        assert processor.target_size(h, w, budget) == (th, tw)
        assert processor.num_soft_tokens(h, w, budget) == (th // 16) * (tw // 16) // 9


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(convert_to_rgb(transparent)).tolist() == [[[255, 255, 255]] * 4] * 4


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_matches_load_image(orientation, tmp_path, processor, ref_pil):
    path = tmp_path / f"chelsea-{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _photo("chelsea").save(path, "JPEG", quality=90, exif=exif)
    ours = processor.decode_image(path.read_bytes())
    theirs = load_image(str(path))  # applies ImageOps.exif_transpose
    assert ours.size == theirs.size == ((451, 300) if orientation == 3 else (300, 451))
    np.testing.assert_array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs))
    expected = ref_pil(theirs, return_tensors="np")
    np.testing.assert_array_equal(processor.preprocess(ours).pixel_values, expected["pixel_values"][0])


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "JPEG"])
def test_decode_formats(fmt, processor, ref_pil):
    source = _rgba() if fmt in ("PNG", "WEBP") else _photo("coffee")
    buf = io.BytesIO()
    if fmt == "GIF":  # two frames: the first one is used
        first, second = source.convert("P"), _photo("coffee").rotate(90).convert("P")
        first.save(buf, "GIF", save_all=True, append_images=[second])
    else:
        source.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    decoded = processor.decode_image(buf.getvalue())
    assert decoded.size == source.size
    reopened = Image.open(io.BytesIO(buf.getvalue()))
    np.testing.assert_array_equal(
        processor.preprocess(decoded, 140).pixel_values,
        ref_pil(reopened, max_soft_tokens=140, return_tensors="np")["pixel_values"][0],
    )
    if fmt in ("PNG", "WEBP"):
        assert decoded.mode == "RGBA"  # alpha kept for preprocess to composite on white


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries only a few bytes of pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (8_000, 8_000)])
def test_oversized_header_is_refused_before_decoding(width, height, processor, monkeypatch):
    def no_decode(self):  # any attempt to decode pixels fails the test
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(InvalidRequest, match="50000000 pixels"):
        processor.decode_image(_png_header(width, height))


def test_pixel_limit_is_configurable(processor):
    small = ImageProcessor(max_image_pixels=100 * 100)
    buf = io.BytesIO()
    Image.new("RGB", (101, 100)).save(buf, "PNG")
    with pytest.raises(InvalidRequest, match="10100 pixels, more than the limit of 10000"):
        small.decode_image(buf.getvalue())
    with pytest.raises(InvalidRequest, match="limit of 10000"):
        small.preprocess(Image.new("RGB", (101, 100)))


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _photo("astronaut").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "empty"),
        (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a readable image"),
        (_jpeg_bytes()[: len(_jpeg_bytes()) // 2], "corrupt or truncated"),
        (_png_header(0, 10), "not a readable image"),
        (b"BM" + b"\x00" * 60, "not a readable image|not accepted"),
    ],
    ids=["zero-bytes", "random-bytes", "truncated-jpeg", "zero-width-png", "bmp"],
)
def test_bad_bytes_are_refused(payload, match, processor):
    with pytest.raises(InvalidRequest, match=match):
        processor.decode_image(payload)


def test_unaccepted_format_is_refused(processor):
    buf = io.BytesIO()
    _photo("chelsea").save(buf, "BMP")
    with pytest.raises(InvalidRequest, match="BMP is not accepted"):
        processor.decode_image(buf.getvalue())


@pytest.mark.parametrize("budget", [0, 69, 100, 281, 2240])
def test_unknown_budget_is_refused(budget, processor, images):
    with pytest.raises(InvalidRequest, match="70, 140, 280, 560, 1120"):
        processor.preprocess(images["square-512"], budget)
    with pytest.raises(InvalidRequest):
        processor.num_soft_tokens(512, 512, budget)


def test_zero_size_image_is_refused(processor):
    with pytest.raises(InvalidRequest, match="zero size"):
        processor.preprocess(Image.new("RGB", (0, 0)))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_soft_tokens"):
        ImageProcessor({"max_soft_tokens": 100})
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessor({"do_center_crop": True, "crop_size": 224})
    with pytest.raises(ValueError, match="do_resize"):
        ImageProcessor({"do_resize": False})
    ImageProcessor({"image_processor_type": "Gemma4ImageProcessor", "size": None})  # ignored
