"""Video frame sampling and preprocessing for Gemma 4, with PyAV and Pillow (no torch, no transformers).

Mirrors ``transformers.Gemma4VideoProcessor`` (transformers 5.23) with its PyAV reader:
- frame count from the stream header (``stream.frames``), rate from ``stream.average_rate``;
- ``num_frames`` (default 32) frames sampled uniformly: ``index_i = i * total // num_frames``
  (transformers' ``default_sample_indices_fn``); or, with ``fps`` set instead,
  ``num_frames = max(1, int(total / video_fps * fps))``;
- frame timestamps ``index / video_fps`` seconds, written ``mm:ss`` in the prompt;
- each frame preprocessed like an image with the video budget (70 soft tokens per frame).

Differences, for serving: a video with fewer frames than requested yields all its frames
(transformers raises); containers without a frame count (WebM, MKV) are counted by demuxing
packets (transformers would see 0 frames); long, huge or undecodable inputs are refused with
`InvalidRequest`. Frames are resized with Pillow's bicubic (as ``Gemma4ImageProcessorPil``), not
torchvision's, so pixel values differ from ``Gemma4VideoProcessor`` by at most a few uint8 levels.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.image_processing import DEFAULT_MAX_IMAGE_PIXELS, ImageProcessor

DEFAULT_NUM_FRAMES = 32  # Gemma4VideoProcessor.num_frames
DEFAULT_VIDEO_SOFT_TOKENS = 70  # Gemma4VideoProcessor.max_soft_tokens (per frame)
MAX_VIDEO_FRAMES = 64  # most frames one request may sample
MAX_VIDEO_DURATION_S = 600.0  # longest video accepted
MAX_FRAME_PIXELS = 3840 * 2160  # largest frame (4K UHD) accepted

# Keys of Gemma4VideoProcessor().to_dict() handled here rather than by ImageProcessor.
_VIDEO_KEYS = frozenset(
    {"do_sample_frames", "num_frames", "fps", "return_metadata", "video_processor_type", "max_soft_tokens"}
)


@dataclass(frozen=True)
class VideoSettings:
    """Sampling policy and limits for one video.

    Attributes:
        num_frames: frames to sample uniformly (mutually exclusive with ``fps``).
        fps: frames per second of video to sample, when ``num_frames`` is None.
        max_soft_tokens: per-frame vision budget (70/140/280/560/1120).
        max_frames: refuse requests that would sample more frames than this.
        max_duration_s: refuse videos longer than this many seconds.
        max_frame_pixels: refuse frames larger than this (width * height).
    """

    num_frames: int | None = DEFAULT_NUM_FRAMES
    fps: float | None = None
    max_soft_tokens: int = DEFAULT_VIDEO_SOFT_TOKENS
    max_frames: int = MAX_VIDEO_FRAMES
    max_duration_s: float = MAX_VIDEO_DURATION_S
    max_frame_pixels: int = MAX_FRAME_PIXELS

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("set exactly one of num_frames and fps")
        if self.num_frames is not None and not 1 <= self.num_frames <= self.max_frames:
            raise ValueError(f"num_frames must be in [1, {self.max_frames}], got {self.num_frames}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps}")


@dataclass(frozen=True)
class SampledFrames:
    """Frames chosen from a video or a live camera, in time order.

    Attributes:
        frames: RGB (decoded video) or caller-supplied Pillow images.
        timestamps_s: seconds from the start of the video for each frame.
        frame_indices: index of each frame among all frames of the source.
        video_fps: frame rate of the source (None for live frames).
        total_num_frames: frames in the source.
    """

    frames: list[Image.Image]
    timestamps_s: list[float]
    frame_indices: list[int]
    video_fps: float | None
    total_num_frames: int


@dataclass(frozen=True)
class PreprocessedVideo:
    """Frames ready for the vision encoder, one `PreprocessedImage` row per frame.

    Attributes:
        pixel_values: float32 ``[num_frames, max_patches, patch_size**2 * 3]``.
        position_ids: int64 ``[num_frames, max_patches, 2]`` ((x, y), -1 for padding).
        num_soft_tokens: soft tokens per frame (equal for frames of one size).
        timestamps_s: seconds for each frame.
    """

    pixel_values: np.ndarray
    position_ids: np.ndarray
    num_soft_tokens: list[int]
    timestamps_s: list[float] = field(default_factory=list)


def settings_from_processor(d: dict[str, Any], **limits: Any) -> tuple[VideoSettings, ImageProcessor]:
    """Split a checkpoint's video-processor dict (``Gemma4VideoProcessor().to_dict()``) into the
    sampling settings and the per-frame `ImageProcessor`. ``limits`` override VideoSettings fields."""
    num_frames = d.get("num_frames", DEFAULT_NUM_FRAMES)
    fps = d.get("fps")
    if fps is not None:
        num_frames = None
    kw: dict[str, Any] = {
        "num_frames": num_frames,
        "fps": fps,
        "max_soft_tokens": int(d.get("max_soft_tokens", DEFAULT_VIDEO_SOFT_TOKENS)),
    }
    kw.update(limits)
    settings = VideoSettings(**kw)
    image_settings = {k: v for k, v in d.items() if k not in _VIDEO_KEYS}
    image_settings["max_soft_tokens"] = settings.max_soft_tokens
    max_pixels = max(settings.max_frame_pixels, DEFAULT_MAX_IMAGE_PIXELS)
    return settings, ImageProcessor(image_settings, max_image_pixels=max_pixels)


def format_timestamp(seconds: float) -> str:
    """``mm:ss`` as in ``Gemma4Processor.replace_video_token`` (minutes not wrapped: 100 min -> "100:00")."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InvalidRequest(f"frame timestamp must be a finite number of seconds >= 0, got {seconds}")
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def sample_frame_indices(
    total_num_frames: int, video_fps: float | None, num_frames: int | None = None, fps: float | None = None
) -> np.ndarray:
    """Indices (int64, ascending) of the frames to keep; transformers' ``default_sample_indices_fn``,
    except that asking for more frames than exist returns every frame instead of raising."""
    if total_num_frames <= 0:
        raise InvalidRequest("video has no frames")
    if num_frames is None and fps is not None:
        if not video_fps:
            raise InvalidRequest("cannot sample by fps: the video's frame rate is unknown")
        num_frames = max(1, int(total_num_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_num_frames, dtype=np.int64)
    num_frames = min(num_frames, total_num_frames)
    return np.arange(num_frames, dtype=np.int64) * total_num_frames // num_frames


def _check_frame_count(count: int, settings: VideoSettings) -> None:
    if count > settings.max_frames:
        raise InvalidRequest(
            f"sampling would keep {count} frames, more than the limit of {settings.max_frames}"
        )


def decode_video(source: bytes | str | Path, settings: VideoSettings | None = None) -> SampledFrames:
    """Decode a video file or its bytes with PyAV and sample frames (see the module docstring).

    Raises:
        InvalidRequest: empty or undecodable data, no video stream, unknown frame rate, a video
            longer than ``max_duration_s``, frames larger than ``max_frame_pixels``, or more than
            ``max_frames`` frames to sample.
    """
    settings = settings or VideoSettings()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidRequest("video data is empty (0 bytes)")
        target: io.BytesIO | str = io.BytesIO(bytes(source))
    else:
        target = str(source)
    try:
        with av.open(target) as container:
            if not container.streams.video:
                raise InvalidRequest("video data has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise InvalidRequest("video frame rate is unknown")
            video_fps = float(rate)
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > settings.max_frame_pixels:
                raise InvalidRequest(
                    f"video frames are {width}x{height} pixels, more than the limit of "
                    f"{settings.max_frame_pixels}"
                )
            if container.duration is not None and container.duration / av.time_base > settings.max_duration_s:
                raise InvalidRequest(
                    f"video is {container.duration / av.time_base:.1f} s long, more than the limit of "
                    f"{settings.max_duration_s:.0f} s"
                )
            total = int(stream.frames)
            if total <= 0:  # no frame count in the header (WebM, MKV): count packets
                total = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
            if total / video_fps > settings.max_duration_s:
                raise InvalidRequest(
                    f"video is {total / video_fps:.1f} s long, more than the limit of "
                    f"{settings.max_duration_s:.0f} s"
                )
            indices = sample_frame_indices(total, video_fps, settings.num_frames, settings.fps)
            _check_frame_count(len(indices), settings)
            wanted = set(indices.tolist())
            frames: list[Image.Image] = []
            kept: list[int] = []
            for i, frame in enumerate(container.decode(stream)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames.append(frame.to_image())
                    kept.append(i)
    except av.FFmpegError as exc:
        raise InvalidRequest(f"video data could not be decoded: {exc}") from exc
    if not frames:
        raise InvalidRequest("video has no decodable frames")
    return SampledFrames(
        frames=frames,
        timestamps_s=[i / video_fps for i in kept],
        frame_indices=kept,
        video_fps=video_fps,
        total_num_frames=total,
    )


def sample_live_frames(
    frames: Sequence[Image.Image], timestamps_s: Sequence[float], settings: VideoSettings | None = None
) -> SampledFrames:
    """Sample already-decoded frames (e.g. live camera frames) with caller timestamps in seconds.

    With ``num_frames`` set, more frames than that are thinned with the same uniform rule as files;
    with ``fps`` set, the rate is taken from the timestamps' span.

    Raises:
        InvalidRequest: no frames, mismatched lengths, timestamps not finite / >= 0 / non-decreasing,
            oversized frames, or more than ``max_frames`` frames to keep.
    """
    settings = settings or VideoSettings()
    if len(frames) == 0:
        raise InvalidRequest("no frames given")
    if len(frames) != len(timestamps_s):
        raise InvalidRequest(f"{len(frames)} frames but {len(timestamps_s)} timestamps")
    ts = [float(t) for t in timestamps_s]
    if not all(math.isfinite(t) and t >= 0 for t in ts) or any(b < a for a, b in itertools.pairwise(ts)):
        raise InvalidRequest("frame timestamps must be finite, >= 0 and non-decreasing seconds")
    if ts[-1] - ts[0] > settings.max_duration_s:
        raise InvalidRequest(
            f"frames span {ts[-1] - ts[0]:.1f} s, more than the limit of {settings.max_duration_s:.0f} s"
        )
    for image in frames:
        w, h = image.size
        if w <= 0 or h <= 0 or w * h > settings.max_frame_pixels:
            raise InvalidRequest(
                f"frame is {w}x{h} pixels; frames must be non-empty and at most "
                f"{settings.max_frame_pixels} pixels"
            )
    span = ts[-1] - ts[0]
    rate = (len(ts) - 1) / span if span > 0 else None
    indices = sample_frame_indices(len(frames), rate, settings.num_frames, settings.fps)
    _check_frame_count(len(indices), settings)
    kept = indices.tolist()
    return SampledFrames(
        frames=[frames[i] for i in kept],
        timestamps_s=[ts[i] for i in kept],
        frame_indices=kept,
        video_fps=None,
        total_num_frames=len(frames),
    )


def preprocess_frames(
    sampled: SampledFrames, image_processor: ImageProcessor, max_soft_tokens: int = DEFAULT_VIDEO_SOFT_TOKENS
) -> PreprocessedVideo:
    """Preprocess each sampled frame with ``image_processor`` at the per-frame video budget."""
    rows = [image_processor.preprocess(frame, max_soft_tokens) for frame in sampled.frames]
    return PreprocessedVideo(
        pixel_values=np.stack([r.pixel_values for r in rows]),
        position_ids=np.stack([r.position_ids for r in rows]),
        num_soft_tokens=[r.num_soft_tokens for r in rows],
        timestamps_s=list(sampled.timestamps_s),
    )


def video_prompt_text(
    timestamps_s: Sequence[float],
    num_soft_tokens: Sequence[int],
    *,
    boi_token: str,
    video_token: str,
    eoi_token: str,
) -> str:
    """Placeholder text for one video: ``"mm:ss <boi><video>*n<eoi>"`` per frame joined by spaces
    (``Gemma4Processor.replace_video_token``)."""
    return " ".join(
        f"{format_timestamp(t)} {boi_token}{video_token * n}{eoi_token}"
        for t, n in zip(timestamps_s, num_soft_tokens, strict=True)
    )
