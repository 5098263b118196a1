"""Real sample inputs for the demo, shipped in the package, and the LibriVox set the tests use.

- ``sample_media/`` (in the package, see its NOTICE): a real photo (NASA's astronaut portrait,
  public domain, as bundled by scikit-image) and a real LibriVox speech recording (16 kHz, from
  CMU Sphinx's pocketsphinx test data, stored losslessly as FLAC) with its transcript. The demo
  needs nothing else: no scikit-image, no Debian package, nothing downloaded.
- ``LIBRIVOX_DIR``: Debian's ``pocketsphinx-testdata`` (five clips with transcripts), which the
  tests and benches use (``make test`` installs it).
"""

from __future__ import annotations

from pathlib import Path

from gemma_mesh.common.errors import NotFound

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
SAMPLE_MEDIA_DIR = Path(__file__).resolve().parent / "sample_media"
SAMPLE_PHOTO = SAMPLE_MEDIA_DIR / "astronaut.jpg"
SAMPLE_SPEECH = SAMPLE_MEDIA_DIR / "sense_and_sensibility_01_austen_64kb-0870.flac"
SAMPLE_TRANSCRIPT = (
    "and mister john dashwood had then leisure to consider how much there might be prudently in "
    "his power to do for them"
)


def librivox_transcripts() -> dict[str, str]:
    """Transcript per clip file stem: the shipped clip's, plus those of ``LIBRIVOX_DIR`` when installed."""
    out: dict[str, str] = {SAMPLE_SPEECH.stem: SAMPLE_TRANSCRIPT}
    path = LIBRIVOX_DIR / "transcription"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if "(" in line:
                text, _, stem = line.rpartition("(")
                out[stem.rstrip(")").strip()] = text.replace("<s>", "").replace("</s>", "").strip()
    return out


def write_samples(out_dir: Path) -> tuple[Path, Path]:
    """Write the shipped photo (PNG, 512x512 RGB) and speech clip (WAV, 16 kHz mono PCM16, the
    recording's own samples) into ``out_dir``.

    Returns:
        ``(photo_path, speech_path)``.

    Raises:
        NotFound: the shipped media are missing (a broken install).
    """
    import soundfile as sf
    from PIL import Image

    for path in (SAMPLE_PHOTO, SAMPLE_SPEECH):
        if not path.is_file():
            raise NotFound(f"{path} is missing from this gemma-mesh install; reinstall gemma-mesh")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    photo_path = out_dir / f"{SAMPLE_PHOTO.stem}.png"
    with Image.open(SAMPLE_PHOTO) as photo:
        photo.convert("RGB").save(photo_path)
    samples, rate = sf.read(SAMPLE_SPEECH, dtype="int16")
    speech_path = out_dir / f"{SAMPLE_SPEECH.stem}.wav"
    sf.write(speech_path, samples, rate, subtype="PCM_16")
    return photo_path, speech_path
