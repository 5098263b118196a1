"""Real sample inputs for the demo and tests, from packages that install offline.

- speech: LibriVox recordings (16 kHz, with transcripts) from Debian's ``pocketsphinx-testdata``;
- photos: scikit-image's bundled ``skimage.data`` images (astronaut, chelsea, coffee, ...).

Nothing is downloaded. ``scikit-image`` is part of the ``test`` extra, not of the serving runtime.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gemma_mesh.common.errors import NotFound

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
DEFAULT_SPEECH = "sense_and_sensibility_01_austen_64kb-0870.wav"
DEFAULT_PHOTO = "astronaut"


def librivox_transcripts() -> dict[str, str]:
    """Transcript per clip file stem, from the package's ``transcription`` file."""
    out: dict[str, str] = {}
    path = LIBRIVOX_DIR / "transcription"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if "(" in line:
                text, _, stem = line.rpartition("(")
                out[stem.rstrip(")").strip()] = text.replace("<s>", "").replace("</s>", "").strip()
    return out


def write_samples(
    out_dir: Path, *, photo: str = DEFAULT_PHOTO, speech: str = DEFAULT_SPEECH
) -> tuple[Path, Path]:
    """Write a real photo (PNG) and copy a real speech clip (WAV) into ``out_dir``.

    Returns:
        ``(photo_path, speech_path)``.

    Raises:
        NotFound: pocketsphinx-testdata or scikit-image is not installed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = LIBRIVOX_DIR / speech
    if not clip.exists():
        raise NotFound(f"{clip} not found: install Debian's pocketsphinx-testdata (make setup does)")
    try:
        from PIL import Image
        from skimage import data as skdata
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise NotFound("scikit-image is not installed: pip install 'gemma-mesh[test]'") from exc
    photo_path = out_dir / f"{photo}.png"
    Image.fromarray(getattr(skdata, photo)()).save(photo_path)
    speech_path = out_dir / clip.name
    shutil.copyfile(clip, speech_path)
    return photo_path, speech_path
