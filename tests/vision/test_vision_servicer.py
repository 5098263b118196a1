"""The vision encoder through a real gRPC server on a loopback port.

Outputs equal the in-process bundle encoder; frames from concurrent callers are batched yet each
caller gets its own result; bad input gets INVALID_ARGUMENT with a message while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY

from gemma_mesh.common.grpc_server import error_detail
from gemma_mesh.common.tensors import from_tensor_pb
from gemma_mesh.model.video import VideoSettings, decode_video, preprocess_frames
from gemma_mesh.proto.v1 import vision_pb2
from gemma_mesh.vision.servicer import SERVICE_NAME

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _photo(width=200, height=150, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _request(data: bytes = b"", budget: int = 0, timestamp_s: float = 0.0, raw=None):
    image = vision_pb2.ImageInput(max_soft_tokens=budget, timestamp_s=timestamp_s)
    if raw is not None:
        image.raw.CopyFrom(raw)
    else:
        image.encoded = data
    return vision_pb2.EncodeImageRequest(image=image)


def _expected(bundle, data: bytes, budget: int | None = None) -> np.ndarray:
    processor = bundle.image_processor
    return bundle.encode_images([processor.preprocess(processor.decode_image(data), budget)])[0]


def _huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width x height`` pixels (a decompression bomb: ~50 KB for 20000x20000)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


async def test_health(vision_server):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{vision_server.port}")
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await channel.close()


def _gif() -> bytes:
    frames = [_photo(seed=1).convert("P"), _photo(seed=2).convert("P")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    return _encode(_photo(240, 120), "JPEG", quality=90, exif=exif)


FORMATS = {
    "jpeg": lambda: _encode(_photo(), "JPEG", quality=90),
    "png-rgba": lambda: _encode(_photo().convert("RGBA"), "PNG"),
    "png-palette": lambda: _encode(_photo().convert("P"), "PNG", transparency=0),
    "png-gray": lambda: _encode(_photo().convert("L"), "PNG"),
    "webp": lambda: _encode(_photo(), "WEBP", quality=90),
    "gif-first-frame": _gif,
    "jpeg-cmyk": lambda: _encode(_photo().convert("CMYK"), "JPEG"),
    "jpeg-exif-rotated": _exif_jpeg,
}


@pytest.mark.parametrize("name", list(FORMATS))
async def test_formats_equal_the_bundle(vision_stub, tiny_bundle, name):
    data = FORMATS[name]()
    reply = await vision_stub.Encode(_request(data, timestamp_s=1.5))
    expected = _expected(tiny_bundle, data)
    assert np.array_equal(from_tensor_pb(reply.soft_tokens), expected)
    assert reply.num_soft_tokens == expected.shape[0] and reply.timestamp_s == 1.5
    if name == "jpeg-exif-rotated":
        assert (reply.width, reply.height) == (120, 240)  # EXIF orientation applied
    else:
        assert (reply.width, reply.height) == (200, 150)


async def test_raw_rgb_and_budgets(vision_server, vision_stub, tiny_bundle):
    image = _photo(300, 200)
    raw = vision_pb2.RawImage(rgb=image.tobytes(), width=300, height=200)
    png = _encode(image, "PNG")
    for budget in (70, 140, 0):
        reply = await vision_stub.Encode(_request(raw=raw, budget=budget))
        expected = _expected(tiny_bundle, png, budget or 280)
        assert np.array_equal(from_tensor_pb(reply.soft_tokens), expected), budget
        assert reply.num_soft_tokens <= (budget or 280)
    engine = vision_server.servicer.engine  # the large budgets: preprocessing only (encoding is slow on CPU)
    for budget in (560, 1120):
        job = engine.prepare_raw(raw.rgb, 300, 200, budget)
        assert job.image.pixel_values.shape[0] == budget * 9 and job.image.num_soft_tokens <= budget


async def test_five_768px_images_in_one_batch_pass_the_4mb_default(vision_stub, tiny_bundle):
    images = [_photo(768, 768, seed=s) for s in range(5)]
    request = vision_pb2.EncodeImageBatchRequest(
        images=[
            vision_pb2.ImageInput(raw=vision_pb2.RawImage(rgb=im.tobytes(), width=768, height=768))
            for im in images
        ]
    )
    assert request.ByteSize() > 4 * 1024 * 1024
    reply = await vision_stub.EncodeBatch(request)
    assert len(reply.results) == 5
    for im, result in zip(images, reply.results, strict=True):
        expected = _expected(tiny_bundle, _encode(im, "PNG"))
        assert np.abs(from_tensor_pb(result.soft_tokens) - expected).max() <= 1e-5


async def test_sixteen_concurrent_clients_get_their_own_results(vision_stub, tiny_bundle):
    datas = [_encode(_photo(120 + 8 * i, 90 + 4 * i, seed=i), "PNG") for i in range(16)]
    budgets = [(70, 140, 280)[i % 3] for i in range(16)]
    before = REGISTRY.get_sample_value("gemma_mesh_vision_batch_size_count") or 0
    replies = await asyncio.gather(
        *(
            vision_stub.Encode(_request(d, b, timestamp_s=i))
            for i, (d, b) in enumerate(zip(datas, budgets, strict=True))
        )
    )
    solos = [_expected(tiny_bundle, d, b) for d, b in zip(datas, budgets, strict=True)]
    for i, reply in enumerate(replies):
        got = from_tensor_pb(reply.soft_tokens)
        assert reply.timestamp_s == i and got.shape == solos[i].shape
        assert np.abs(got - solos[i]).max() <= 1e-5
        others = [j for j in range(16) if j != i and solos[j].shape == got.shape]
        assert all(np.abs(got - solos[j]).max() > 1e-3 for j in others)
    runs = (REGISTRY.get_sample_value("gemma_mesh_vision_batch_size_count") or 0) - before
    assert runs < 16  # batched across requests


async def test_video_frames_with_timestamps(vision_stub, tiny_bundle, tmp_path):
    path = tmp_path / "clip.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=2:size=160x120:rate=10",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )
    reply = await vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(data=path.read_bytes(), num_frames=4))
    assert [f.timestamp_s for f in reply.frames] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    sampled = decode_video(path, VideoSettings(num_frames=4))
    video_processor = tiny_bundle.settings["video_processor"]
    from gemma_mesh.model.video import settings_from_processor

    _, frame_processor = settings_from_processor(video_processor)
    pre = preprocess_frames(sampled, frame_processor, 70)
    for i, frame in enumerate(reply.frames):
        assert frame.num_soft_tokens == pre.num_soft_tokens[i] <= 70 and (frame.width, frame.height) == (
            160,
            120,
        )
    first = tiny_bundle.encode_images([frame_processor.preprocess(sampled.frames[0], 70)])[0]
    assert np.abs(from_tensor_pb(reply.frames[0].soft_tokens) - first).max() <= 1e-5


BAD = {
    "empty": (_request(b""), "empty"),
    "corrupt": (_request(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "not a readable image"),
    "truncated png": (_request(_encode(_photo(), "PNG")[:600]), "truncated"),
    "truncated jpeg": (_request(_encode(_photo(), "JPEG")[:400]), "image"),
    "bomb 20000x20000": (_request(_huge_png(20_000, 20_000)), "pixels"),
    "unknown budget": (_request(_encode(_photo(), "PNG"), budget=300), "max_soft_tokens must be one of"),
    "raw wrong size": (_request(raw=vision_pb2.RawImage(rgb=b"\x00" * 10, width=2, height=2)), "needs 12"),
    "raw zero size": (_request(raw=vision_pb2.RawImage(rgb=b"", width=0, height=5)), "zero size"),
    "raw too large": (_request(raw=vision_pb2.RawImage(rgb=b"", width=100_000, height=100_000)), "limit"),
    "nan timestamp": (_request(_encode(_photo(), "PNG"), timestamp_s=float("nan")), "timestamp_s"),
    "no source": (vision_pb2.EncodeImageRequest(), "encoded or raw"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_images_are_invalid_argument(vision_stub, case):
    request, message = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await vision_stub.Encode(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert error_detail(err.value).code == "invalid_request_error"
    ok = await vision_stub.Encode(_request(_encode(_photo(), "PNG")))  # still serving
    assert ok.num_soft_tokens > 0


async def test_bad_batches_and_videos_are_invalid_argument(vision_stub):
    good = vision_pb2.ImageInput(encoded=_encode(_photo(), "PNG"))
    cases = [
        (vision_stub.EncodeBatch(vision_pb2.EncodeImageBatchRequest()), "1 to 64"),
        (
            vision_stub.EncodeBatch(
                vision_pb2.EncodeImageBatchRequest(images=[good, vision_pb2.ImageInput(encoded=b"x")])
            ),
            "images[1]",
        ),
        (vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(data=b"")), "empty"),
        (vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(data=b"\x00" * 500)), "could not be decoded"),
        (vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(data=b"\x00", num_frames=65)), "num_frames"),
        (
            vision_stub.EncodeVideo(vision_pb2.EncodeVideoRequest(data=b"\x00", max_soft_tokens=71)),
            "max_soft_tokens",
        ),
    ]
    for call, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


async def test_metrics_count_images_and_errors(vision_stub):
    await vision_stub.Encode(_request(_encode(_photo(), "PNG")))
    with pytest.raises(grpc.aio.AioRpcError):
        await vision_stub.Encode(_request(b""))

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    assert value("gemma_mesh_vision_images_total", rpc="Encode") >= 1
    assert value("gemma_mesh_vision_errors_total", rpc="Encode", code="INVALID_ARGUMENT") >= 1
    assert value("gemma_mesh_vision_request_seconds_count", rpc="Encode") >= 2
    assert value("gemma_mesh_vision_batch_size_count") >= 1


async def test_camera_frames_use_the_video_per_frame_budget(vision_stub, tiny_bundle):
    """``video_frame``: a live camera frame is encoded as EncodeVideo encodes each sampled frame
    (the video processor at its per-frame budget), not as a still image at the image default."""
    from gemma_mesh.model.video import settings_from_processor

    defaults, frame_processor = settings_from_processor(tiny_bundle.settings["video_processor"])
    per_frame = tiny_bundle.manifest.video.max_soft_tokens_per_frame
    assert defaults.max_soft_tokens == per_frame < tiny_bundle.manifest.vision.default_max_soft_tokens
    photo = _photo(640, 480)
    data = _encode(photo, "JPEG", quality=90)
    frame = vision_pb2.ImageInput(encoded=data, video_frame=True, timestamp_s=3.5)
    reply = await vision_stub.Encode(vision_pb2.EncodeImageRequest(image=frame))
    expected = tiny_bundle.encode_images(
        [frame_processor.preprocess(frame_processor.decode_image(data), per_frame)]
    )[0]
    assert reply.num_soft_tokens == expected.shape[0] and reply.timestamp_s == 3.5
    assert np.abs(from_tensor_pb(reply.soft_tokens) - expected).max() <= 1e-5
    still = await vision_stub.Encode(_request(data))
    assert still.num_soft_tokens > reply.num_soft_tokens  # the image default is a larger budget
    # raw RGB frames take the same path; an explicit budget still wins
    raw = vision_pb2.RawImage(rgb=photo.tobytes(), width=640, height=480)
    same = await vision_stub.Encode(
        vision_pb2.EncodeImageRequest(image=vision_pb2.ImageInput(raw=raw, video_frame=True))
    )
    assert same.num_soft_tokens == reply.num_soft_tokens
    bigger = await vision_stub.Encode(
        vision_pb2.EncodeImageRequest(
            image=vision_pb2.ImageInput(encoded=data, video_frame=True, max_soft_tokens=140)
        )
    )
    assert bigger.num_soft_tokens > reply.num_soft_tokens


async def test_describe_reports_the_bundles_budgets(vision_stub, tiny_bundle):
    reply = await vision_stub.Describe(vision_pb2.DescribeRequest())
    vision, video = tiny_bundle.manifest.vision, tiny_bundle.manifest.video
    assert list(reply.supported_soft_tokens) == list(vision.supported_soft_tokens)
    assert reply.default_max_soft_tokens == vision.default_max_soft_tokens
    assert reply.max_soft_tokens_per_frame == video.max_soft_tokens_per_frame
