"""Video sampling and preprocessing vs transformers' Gemma4VideoProcessor with its PyAV reader."""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers import Gemma4ImageProcessorPil, Gemma4Processor, Gemma4VideoProcessor
from transformers.video_utils import VideoMetadata, load_video

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.video import (
    DEFAULT_NUM_FRAMES,
    VideoSettings,
    decode_video,
    format_timestamp,
    preprocess_frames,
    sample_frame_indices,
    sample_live_frames,
    settings_from_processor,
    video_prompt_text,
)

# Frames are resized with Pillow (as Gemma4ImageProcessorPil) while Gemma4VideoProcessor uses
# torchvision; see test_image_processing.py. On testsrc frames (320x240 -> 336x432, 63 tokens at budget 70)
# the measured difference is at most 2/255, 99th percentile 1/255; one level of headroom.
MAX_ABS = 3 / 255 + 1e-6
P99_ABS = 1 / 255 + 1e-6


def _ffmpeg(out: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, str(out)], check=True)
    return out


def _testsrc(out: Path, seconds: int, rate: int = 10) -> Path:
    return _ffmpeg(
        out,
        "-f",
        "lavfi",
        "-i",
        f"testsrc=duration={seconds}:size=320x240:rate={rate}",
        "-pix_fmt",
        "yuv420p",
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4-3s": _testsrc(d / "a.mp4", 3),
        "mp4-5s": _testsrc(d / "b.mp4", 5),
        "webm-3s": _testsrc(d / "c.webm", 3),
        "audio-only": _ffmpeg(d / "tone.wav", "-f", "lavfi", "-i", "sine=frequency=440:duration=1"),
    }


@pytest.fixture(scope="module")
def hf() -> Gemma4VideoProcessor:
    return Gemma4VideoProcessor()


@pytest.fixture(scope="module")
def setup(hf):
    return settings_from_processor(hf.to_dict())


def _hf_decode(path: Path, hf: Gemma4VideoProcessor, num_frames: int):
    """What Gemma4VideoProcessor decodes from a path with the PyAV backend."""
    return load_video(
        str(path), backend="pyav", sample_indices_fn=partial(hf.sample_frames, num_frames=num_frames)
    )


def test_settings_follow_the_processor(setup):
    settings, image_processor = setup
    assert settings.num_frames == DEFAULT_NUM_FRAMES == 32 and settings.fps is None
    assert settings.max_soft_tokens == 70 and image_processor.max_soft_tokens == 70
    assert image_processor.do_normalize  # mean 0, std 1: identity, kept for parity


@pytest.mark.parametrize(
    ("name", "num_frames"), [("mp4-3s", 1), ("mp4-3s", 8), ("mp4-3s", 30), ("mp4-5s", 32)]
)
def test_sampling_and_frames_match_transformers(name, num_frames, videos, hf):
    path = videos[name]
    ours = decode_video(path, VideoSettings(num_frames=num_frames))
    frames, metadata = _hf_decode(path, hf, num_frames)
    assert ours.frame_indices == list(metadata.frames_indices)
    assert ours.timestamps_s == pytest.approx(metadata.timestamps, abs=1e-12)
    assert ours.video_fps == metadata.fps == 10.0 and ours.total_num_frames == metadata.total_num_frames
    assert len(ours.frames) == len(frames) == num_frames
    for image, expected in zip(ours.frames, frames, strict=True):
        np.testing.assert_array_equal(np.asarray(image), expected)  # same PyAV rgb24 conversion


def test_default_sampling_of_a_5s_video(videos):
    ours = decode_video(videos["mp4-5s"])
    assert ours.frame_indices == (np.arange(32) * 50 // 32).tolist()
    assert [format_timestamp(t) for t in ours.timestamps_s][-3:] == ["00:04", "00:04", "00:04"]


def test_pixels_match_gemma4_video_processor(videos, hf, setup):
    settings, image_processor = setup
    frames, metadata = load_video(str(videos["mp4-5s"]), backend="pyav")  # every frame
    expected = hf(frames, video_metadata=metadata, return_metadata=True, return_tensors="np")
    ours = preprocess_frames(
        decode_video(videos["mp4-5s"], settings), image_processor, settings.max_soft_tokens
    )
    assert list(expected["video_metadata"][0].frames_indices) == (np.arange(32) * 50 // 32).tolist()
    assert ours.timestamps_s == pytest.approx(expected["video_metadata"][0].timestamps)
    assert ours.pixel_values.shape == expected["pixel_values_videos"].shape == (32, 630, 768)
    np.testing.assert_array_equal(ours.position_ids, expected["video_position_ids"])
    assert ours.num_soft_tokens == [expected["num_soft_tokens_per_video"][0]] * 32 == [63] * 32
    diff = np.abs(ours.pixel_values - expected["pixel_values_videos"])
    assert diff.max() <= MAX_ABS and np.quantile(diff, 0.99) <= P99_ABS
    # Against the Pillow image backend at the video budget the frames are bit-identical.
    pil = Gemma4ImageProcessorPil()
    for i in (0, 17, 31):
        frame = Image.fromarray(frames[expected["video_metadata"][0].frames_indices[i]])
        np.testing.assert_array_equal(
            ours.pixel_values[i], pil(frame, max_soft_tokens=70, return_tensors="np")["pixel_values"][0]
        )


def test_fps_sampling(videos):
    ours = decode_video(videos["mp4-5s"], VideoSettings(num_frames=None, fps=2.0))
    # transformers' rule: max(1, int(total / video_fps * fps)) frames, uniformly spaced
    assert ours.frame_indices == (np.arange(10) * 50 // 10).tolist()
    assert ours.timestamps_s == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5])


def test_short_video_yields_every_frame_where_transformers_raises(videos, hf):
    ours = decode_video(videos["mp4-3s"])  # 30 frames < num_frames=32
    assert ours.frame_indices == list(range(30))
    with pytest.raises(ValueError, match="exceeds total_num_frames"):
        _hf_decode(videos["mp4-3s"], hf, 32)


def test_webm_without_frame_count_and_bytes_input(videos):
    webm = decode_video(videos["webm-3s"], VideoSettings(num_frames=8))
    mp4 = decode_video(videos["mp4-3s"].read_bytes(), VideoSettings(num_frames=8))
    assert webm.total_num_frames == mp4.total_num_frames == 30
    assert webm.frame_indices == mp4.frame_indices == [0, 3, 7, 11, 15, 18, 22, 26]
    assert webm.frames[0].size == (320, 240)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "00:00"),
        (0.9, "00:00"),
        (59.99, "00:59"),
        (60.0, "01:00"),
        (61.5, "01:01"),
        (3599.9, "59:59"),
        (6000.0, "100:00"),
    ],
)
def test_format_timestamp(seconds, text):
    assert format_timestamp(seconds) == text


def test_prompt_text_matches_replace_video_token():
    stub = SimpleNamespace(boi_token="<boi>", video_token="<|video|>", eoi_token="<eoi>")
    indices = (np.arange(32) * 50 // 32).tolist()
    metadata = VideoMetadata(total_num_frames=50, fps=10.0, frames_indices=indices)
    expected = Gemma4Processor.replace_video_token(
        stub, {"num_soft_tokens_per_video": [64], "video_metadata": [metadata]}, 0
    )
    ours = video_prompt_text(
        [i / 10.0 for i in indices], [64] * 32, boi_token="<boi>", video_token="<|video|>", eoi_token="<eoi>"
    )
    assert ours == expected


def test_live_frames(setup):
    settings, image_processor = setup
    frames = [Image.new("RGB", (640, 480), (i, 255 - i, 0)) for i in range(100)]
    timestamps = [i * 0.1 for i in range(100)]
    sampled = sample_live_frames(frames, timestamps, settings)
    assert sampled.frame_indices == (np.arange(32) * 100 // 32).tolist()
    assert sampled.timestamps_s == [timestamps[i] for i in sampled.frame_indices]
    assert sampled.frames[1] is frames[3]
    out = preprocess_frames(sampled, image_processor, settings.max_soft_tokens)
    assert (
        out.pixel_values.shape == (32, 630, 768)
        and out.num_soft_tokens == [image_processor.num_soft_tokens(480, 640, 70)] * 32
    )
    few = sample_live_frames(frames[:5], timestamps[:5], settings)
    assert few.frame_indices == [0, 1, 2, 3, 4]
    by_rate = sample_live_frames(frames, timestamps, VideoSettings(num_frames=None, fps=1.0))
    assert by_rate.frame_indices == list(range(0, 100, 10))  # 10 frames/s estimated from the timestamps


def test_sample_frame_indices_matches_transformers_rule():
    for total in (1, 7, 30, 50, 1000):
        for n in (1, 8, 32):
            if n <= total:
                metadata = VideoMetadata(total_num_frames=total, fps=25.0)
                hf = Gemma4VideoProcessor().sample_frames(metadata, num_frames=n)
                np.testing.assert_array_equal(sample_frame_indices(total, 25.0, n), hf)


@pytest.mark.parametrize(
    ("source", "match"),
    [(b"", "empty"), (b"\x00garbage" * 200, "could not be decoded")],
    ids=["empty", "garbage"],
)
def test_bad_bytes_are_refused(source, match):
    with pytest.raises(InvalidRequest, match=match):
        decode_video(source)


def test_limits(videos):
    with pytest.raises(InvalidRequest, match="no video stream"):
        decode_video(videos["audio-only"])
    with pytest.raises(InvalidRequest, match="limit of 2 s"):
        decode_video(videos["mp4-3s"], VideoSettings(max_duration_s=2.0))
    with pytest.raises(InvalidRequest, match="320x240 pixels, more than the limit of 76799"):
        decode_video(videos["mp4-3s"], VideoSettings(max_frame_pixels=320 * 240 - 1))
    with pytest.raises(InvalidRequest, match="limit of 4"):
        decode_video(videos["mp4-3s"], VideoSettings(num_frames=None, fps=5.0, max_frames=4))
    frame = Image.new("RGB", (8, 8))
    with pytest.raises(InvalidRequest, match="2 frames but 1 timestamps"):
        sample_live_frames([frame, frame], [0.0])
    with pytest.raises(InvalidRequest, match="non-decreasing"):
        sample_live_frames([frame, frame], [1.0, 0.5])
    with pytest.raises(InvalidRequest, match="no frames"):
        sample_live_frames([], [])
    with pytest.raises(InvalidRequest, match="finite"):
        format_timestamp(float("nan"))
    with pytest.raises(ValueError, match="exactly one"):
        VideoSettings(num_frames=8, fps=1.0)
    with pytest.raises(ValueError, match="num_frames"):
        VideoSettings(num_frames=65)
