"""The demo's shipped media are the real photo and recording they claim to be, written without
scikit-image, torch or Debian's test data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image
from skimage import data as skdata

from gemma_mesh.samples import LIBRIVOX_DIR, SAMPLE_SPEECH, librivox_transcripts, write_samples

REPO = Path(__file__).resolve().parents[1]


def test_written_samples_are_the_real_photo_and_recording(tmp_path):
    photo, speech = write_samples(tmp_path)
    assert (photo.name, speech.name) == ("astronaut.png", "sense_and_sensibility_01_austen_64kb-0870.wav")
    pixels = np.asarray(Image.open(photo)).astype(np.int16)
    reference = skdata.astronaut().astype(np.int16)
    assert pixels.shape == reference.shape == (512, 512, 3)
    error = np.abs(pixels - reference)
    psnr = 10 * np.log10(255**2 / np.mean(error.astype(np.float64) ** 2))
    assert error.mean() < 3.0 and psnr > 35, (error.mean(), psnr)  # JPEG quality 90 (4:2:0) of that photo
    samples, rate = sf.read(speech, dtype="int16")
    original, original_rate = sf.read(LIBRIVOX_DIR / speech.name, dtype="int16")
    assert rate == original_rate == 16_000 and sf.info(speech).subtype == "PCM_16"
    np.testing.assert_array_equal(samples, original)  # lossless: the recording's own samples


def test_shipped_transcript_matches_the_test_datas():
    from_debian = {}
    for line in (LIBRIVOX_DIR / "transcription").read_text(encoding="utf-8").splitlines():
        text, _, stem = line.rpartition("(")
        from_debian[stem.rstrip(")").strip()] = text.replace("<s>", "").replace("</s>", "").strip()
    assert librivox_transcripts()[SAMPLE_SPEECH.stem] == from_debian[SAMPLE_SPEECH.stem]
    assert from_debian[SAMPLE_SPEECH.stem].startswith("and mister john dashwood")


def test_writing_samples_needs_neither_scikit_image_nor_torch(tmp_path):
    code = (
        "import sys\n"
        "from gemma_mesh.samples import write_samples\n"
        f"write_samples({str(tmp_path)!r})\n"
        "assert not {'skimage', 'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "services")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "astronaut.png",
        "sense_and_sensibility_01_austen_64kb-0870.wav",
    ]
