"""Decode audio files or PCM into mono float32 at the model's rate (16 kHz).

Containers go through ``soundfile`` (WAV, FLAC, OGG/Vorbis/Opus, MP3 with libsndfile >= 1.1) and fall
back to PyAV (WebM/Opus, M4A, anything FFmpeg reads). Stereo is averaged to mono; resampling uses
``soxr`` (VHQ). Errors are ``InvalidRequest`` with the reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from gemma_mesh.common.errors import InvalidRequest

# Files larger than this are refused before decoding (about 10 minutes of 16-bit stereo 48 kHz WAV).
MAX_ENCODED_AUDIO_BYTES = 128 * 1024 * 1024


def resample(samples: np.ndarray, from_rate_hz: int, to_rate_hz: int) -> np.ndarray:
    """Resample mono ``samples [n] float32`` with soxr; returns float32."""
    if from_rate_hz <= 0:
        raise InvalidRequest(f"sample rate must be positive, got {from_rate_hz} Hz")
    if from_rate_hz == to_rate_hz:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(
        samples.astype(np.float32, copy=False), from_rate_hz, to_rate_hz, quality="VHQ"
    ).astype(np.float32, copy=False)


def _to_mono(data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        if data.shape[1] == 0:
            raise InvalidRequest("audio has zero channels")
        data = data.mean(axis=1)
    return data.astype(np.float32, copy=False)


def _decode_with_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest("the file has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            chunks = []
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except InvalidRequest:
        raise
    except Exception as exc:  # PyAV raises many error types for corrupt input
        raise InvalidRequest(f"cannot decode audio: {exc}") from exc
    if not chunks:
        raise InvalidRequest("the audio stream is empty")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def decode_audio(data: bytes | Path, target_rate_hz: int) -> np.ndarray:
    """Decode an encoded audio file to mono float32 at ``target_rate_hz``.

    Returns:
        ``[samples] float32`` in [-1, 1].

    Raises:
        InvalidRequest: empty, oversized, corrupt or truncated data, zero channels, non-finite samples.
    """
    if isinstance(data, Path):
        data = data.read_bytes()
    if not data:
        raise InvalidRequest("audio data is empty")
    if len(data) > MAX_ENCODED_AUDIO_BYTES:
        raise InvalidRequest(f"audio file is {len(data)} bytes; the limit is {MAX_ENCODED_AUDIO_BYTES}")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        samples = _to_mono(samples)
    except InvalidRequest:
        raise
    except Exception:
        samples, rate = _decode_with_av(data)
    if samples.size == 0:
        raise InvalidRequest("audio has no samples")
    if not np.all(np.isfinite(samples)):
        raise InvalidRequest("audio contains NaN or infinite samples")
    return resample(samples, int(rate), target_rate_hz)
