"""Real test media for the gateway tests, made with ffmpeg from installed sources (nothing downloaded).

* ``fake_microphone_wav``: LibriVox clips (Debian's pocketsphinx-testdata, 16 kHz mono) as one
  48 kHz 16-bit mono WAV, each clip followed by a second of silence, for Chromium's
  ``--use-file-for-fake-audio-capture`` (Chromium resamples a file to its fake device's rate, but
  a 48 kHz file is what the device runs at, so only the page's own resampler is exercised).
* ``fake_camera_y4m``: scikit-image's astronaut photo as a 320x240 yuv420p Y4M clip for
  ``--use-file-for-fake-video-capture`` (Chromium loops it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

FAKE_MIC_RATE_HZ = 48000
SILENCE_AFTER_CLIP_S = 1.0


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def fake_microphone_wav(clips: Sequence[Path], out: Path, *, silence_s: float = SILENCE_AFTER_CLIP_S) -> Path:
    """``clips`` concatenated, each padded with ``silence_s`` of silence, as a 48 kHz PCM16 mono WAV."""
    inputs: list[str] = []
    filters: list[str] = []
    for i, clip in enumerate(clips):
        inputs += ["-i", str(clip)]
        filters.append(
            f"[{i}:a]aresample={FAKE_MIC_RATE_HZ}:resampler=soxr,aformat=channel_layouts=mono,"
            f"apad=pad_dur={silence_s}[a{i}]"
        )
    joined = "".join(f"[a{i}]" for i in range(len(clips)))
    graph = ";".join(filters) + f";{joined}concat=n={len(clips)}:v=0:a=1[out]"
    _ffmpeg(
        *inputs,
        "-filter_complex",
        graph,
        "-map",
        "[out]",
        "-c:a",
        "pcm_s16le",
        "-ar",
        str(FAKE_MIC_RATE_HZ),
        str(out),
    )
    return out


def fake_camera_y4m(out: Path, *, seconds: float = 3.0, width: int = 320, height: int = 240) -> Path:
    """scikit-image's astronaut photo as a still ``width`` x ``height`` yuv420p Y4M clip."""
    from PIL import Image
    from skimage import data as skdata

    png = out.with_suffix(".png")
    Image.fromarray(skdata.astronaut()).save(png)
    _ffmpeg(
        "-loop",
        "1",
        "-i",
        str(png),
        "-t",
        str(seconds),
        "-r",
        "10",
        "-pix_fmt",
        "yuv420p",
        "-vf",
        f"scale={width}:{height}",
        str(out),
    )
    return out
