"""The ``gemma-mesh`` command line, run as a user runs it (subprocess), on real photos and speech."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from skimage import data as skdata

from gemma_mesh.pipeline import run_generate

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services")}
    return subprocess.run(
        [sys.executable, "-m", "gemma_mesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "chelsea.jpg"
    Image.fromarray(skdata.chelsea()).save(path, quality=90)
    return path


def test_generate_json_with_a_real_photo_and_speech_on_the_embedded_bundle(photo, librivox_clips):
    proc = _cli(
        "generate", "--prompt", "Describe the cat and transcribe the speech.",
        "--image", str(photo), "--audio", str(librivox_clips[2]), "--max-tokens", "12", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids"} and 1 <= len(out["token_ids"]) <= 12
    # The same request in process gives the same tokens (greedy is deterministic).
    result = run_generate(
        bundle_path=None,
        prompt="Describe the cat and transcribe the speech.",
        images=[photo],
        audios=[librivox_clips[2]],
        max_tokens=12,
    )
    assert out["token_ids"] == result.token_ids and out["text"] == result.text
    assert result.prompt_tokens > 100  # image and audio soft tokens are in the prompt


def test_generate_streams_text_and_accepts_an_exported_bundle(tiny_bundle_dir):
    proc = _cli(
        "generate", "--bundle", str(tiny_bundle_dir), "--prompt", "Hello", "--system", "Be brief.",
        "--max-tokens", "6", "--temperature", "0.8", "--seed", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = _cli(
        "generate", "--bundle", str(tiny_bundle_dir), "--prompt", "Hello", "--system", "Be brief.",
        "--max-tokens", "6", "--temperature", "0.8", "--seed", "3",
    )  # fmt: skip
    assert proc.stdout == again.stdout and proc.stdout.endswith("\n")


def test_demo_runs_on_real_input(tmp_path):
    """The README's first command: the mesh up, a real recording and a real photo through a live session."""
    from gemma_mesh.up import free_port

    proc = _cli("demo", "--samples-dir", str(tmp_path), "--port", str(free_port()), "--no-keep-running")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "astronaut.png").exists()
    assert "mister john dashwood" in proc.stderr  # the clip's transcript, for comparison
    lines = proc.stdout.splitlines()
    assert any(line.startswith("final ") for line in lines), proc.stdout
    assert any(line.startswith("frame ") for line in lines), proc.stdout
    assert "final caption(s)" in proc.stderr


@pytest.mark.parametrize(
    ("kind", "content", "message"),
    [
        ("image", b"", "empty"),
        ("image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
        ("audio", b"RIFF0000WAVEfmt garbage", "audio"),
    ],
)
def test_bad_media_exits_2_with_a_message(tmp_path, kind, content, message):
    path = tmp_path / ("bad.png" if kind == "image" else "bad.wav")
    path.write_bytes(content)
    proc = _cli("generate", "--prompt", "x", f"--{kind}", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and message in proc.stderr.lower()


def test_audio_over_30_s_is_refused_with_the_limit(tmp_path, librivox_clips):
    speech = np.concatenate([sf.read(p, dtype="float32")[0] for p in librivox_clips] * 4)
    assert speech.shape[0] > 30 * 16_000
    path = tmp_path / "long.wav"
    sf.write(path, speech, 16_000)
    proc = _cli("generate", "--prompt", "x", "--audio", str(path))
    assert proc.returncode == 2
    assert "30 s" in proc.stderr and "segment" in proc.stderr


def test_a_tiny_file_claiming_hours_is_refused_before_decoding(tmp_path):
    path = tmp_path / "hour.webm"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono", "-t", "3600",
         "-c:a", "libopus", "-b:a", "6k", str(path)],
        check=True, timeout=120,
    )  # fmt: skip
    assert path.stat().st_size < 4 * 1024 * 1024
    started = time.monotonic()
    proc = _cli("generate", "--prompt", "x", "--audio", str(path))
    assert proc.returncode == 2 and "segment" in proc.stderr
    assert time.monotonic() - started < 60


def test_missing_file_and_bad_options(tmp_path):
    proc = _cli("generate", "--prompt", "x", "--image", str(tmp_path / "nope.png"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = _cli("generate", "--prompt", "x", "--temperature", "-1")
    assert proc.returncode == 2 and "temperature" in proc.stderr
    proc = _cli("export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "config.json" in proc.stderr
