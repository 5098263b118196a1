"""Helpers shared by the audio tests: encode test signals as files or PCM bytes."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

RATE_HZ = 16_000


def wav_bytes(
    samples: np.ndarray, rate_hz: int = RATE_HZ, subtype: str = "PCM_16", fmt: str = "WAV"
) -> bytes:
    """Encode float samples ``[n]`` or ``[n, channels]`` with libsndfile."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def s16(samples: np.ndarray) -> bytes:
    """float [-1, 1] -> interleaved s16le bytes."""
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
