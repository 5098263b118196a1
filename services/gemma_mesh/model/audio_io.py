"""Decode audio files or PCM into mono float32 at the model's rate (16 kHz).

Containers go through ``soundfile`` (WAV, FLAC, OGG/Vorbis/Opus, MP3 with libsndfile >= 1.1) and fall
back to PyAV (WebM/Opus, M4A, anything FFmpeg reads) when libsndfile cannot open them. Stereo is
averaged to mono; resampling uses ``soxr`` (VHQ), one-shot (`resample`) or chunked
(`PcmStreamDecoder`, bit-identical to one-shot on the same samples). Errors are ``InvalidRequest``
with the reason:

- empty, oversized, corrupt or truncated data (a WAV whose ``data`` chunk is longer than the file, an
  MP3/FLAC/WebM that decodes to less than its header's length, or a stream libsndfile loses sync in);
- zero channels, non-finite samples, sample rates outside [`MIN_SAMPLE_RATE_HZ`, `MAX_SAMPLE_RATE_HZ`];
- a declared sample rate that contradicts the file's header.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from gemma_mesh.common.errors import InvalidRequest

# Files larger than this are refused before decoding (about 10 minutes of 16-bit stereo 48 kHz WAV).
MAX_ENCODED_AUDIO_BYTES = 128 * 1024 * 1024
MIN_SAMPLE_RATE_HZ = 1_000
MAX_SAMPLE_RATE_HZ = 384_000
MAX_CHANNELS = 64
# A decoded file may be this much shorter than its header says before it counts as truncated
# (MP3 headers estimate the length; encoder delay and padding differ by a frame or two).
TRUNCATION_TOLERANCE_S = 0.1
# PCM sample formats: name -> little-endian numpy dtype and the scale to [-1, 1].
PCM_FORMATS: dict[str, tuple[np.dtype, float]] = {
    "s16le": (np.dtype("<i2"), 1.0 / 32768.0),
    "f32le": (np.dtype("<f4"), 1.0),
}
# WAV "data" chunk sizes that streaming writers use for "unknown length".
_UNKNOWN_RIFF_SIZES = (0, 0xFFFFFFFF)


def check_sample_rate(rate_hz: int, *, param: str = "sample_rate_hz") -> int:
    """Return ``rate_hz`` if it lies in [`MIN_SAMPLE_RATE_HZ`, `MAX_SAMPLE_RATE_HZ`]; else InvalidRequest."""
    if not MIN_SAMPLE_RATE_HZ <= rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise InvalidRequest(
            f"{param} must be between {MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ} Hz, got {rate_hz}",
            param=param,
        )
    return int(rate_hz)


def check_channels(channels: int, *, param: str = "channels") -> int:
    """Return ``channels`` if in [1, `MAX_CHANNELS`]; else InvalidRequest ("zero channels", ...)."""
    if channels <= 0:
        raise InvalidRequest(
            f"audio has zero channels ({param}={channels}); at least 1 is needed", param=param
        )
    if channels > MAX_CHANNELS:
        raise InvalidRequest(f"{param}={channels} is more than the limit of {MAX_CHANNELS}", param=param)
    return int(channels)


def resample(samples: np.ndarray, from_rate_hz: int, to_rate_hz: int) -> np.ndarray:
    """Resample mono ``samples [n] float32`` with soxr (VHQ); returns float32 ``[round(n * to / from)]``."""
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
        data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return data.astype(np.float32, copy=False)


def _check_finite(samples: np.ndarray) -> None:
    if not np.all(np.isfinite(samples)):
        raise InvalidRequest("audio contains NaN or infinite samples")


def decode_pcm(data: bytes, encoding: str, channels: int) -> np.ndarray:
    """Raw interleaved PCM -> mono float32 ``[frames]`` at the same rate (channels averaged).

    Args:
        data: little-endian samples, ``channels`` interleaved, a whole number of frames.
        encoding: ``"s16le"`` (scaled by 1/32768) or ``"f32le"``.

    Raises:
        InvalidRequest: unknown encoding, zero or too many channels, empty data, a byte count that is
            not a whole number of frames, NaN or infinite samples.
    """
    if encoding not in PCM_FORMATS:
        raise InvalidRequest(f"PCM encoding must be one of {sorted(PCM_FORMATS)}, got {encoding!r}")
    check_channels(channels)
    dtype, scale = PCM_FORMATS[encoding]
    frame_bytes = dtype.itemsize * channels
    if not data:
        raise InvalidRequest("audio data is empty (0 bytes)")
    if len(data) % frame_bytes:
        raise InvalidRequest(
            f"PCM data is {len(data)} bytes, not a whole number of {frame_bytes}-byte frames "
            f"({encoding}, {channels} channel(s))"
        )
    samples = np.frombuffer(data, dtype=dtype).reshape(-1, channels).astype(np.float32) * np.float32(scale)
    mono = _to_mono(samples)
    _check_finite(mono)
    return mono


class PcmStreamDecoder:
    """Chunked PCM -> mono float32 at ``target_rate_hz``; chunks may split a frame anywhere.

    ``push(bytes)`` returns the samples ready so far (soxr keeps a few ms of filter state), ``flush()``
    returns the rest. The concatenation equals ``resample(decode_pcm(all bytes), rate, target)``.

    Raises:
        InvalidRequest: bad encoding, rate or channel count (at construction); non-finite samples
            (``push``); a trailing partial frame (``flush``).
    """

    def __init__(self, encoding: str, rate_hz: int, channels: int, target_rate_hz: int) -> None:
        if encoding not in PCM_FORMATS:
            raise InvalidRequest(f"PCM encoding must be one of {sorted(PCM_FORMATS)}, got {encoding!r}")
        self.encoding = encoding
        self.rate_hz = check_sample_rate(rate_hz)
        self.channels = check_channels(channels)
        self.target_rate_hz = target_rate_hz
        self.frame_bytes = PCM_FORMATS[encoding][0].itemsize * channels
        self.input_frames = 0
        self._carry = b""
        self._stream = (
            None
            if rate_hz == target_rate_hz
            else soxr.ResampleStream(rate_hz, target_rate_hz, 1, dtype="float32", quality="VHQ")
        )

    def push(self, data: bytes) -> np.ndarray:
        """Decode one chunk; returns float32 ``[n]`` at the target rate (possibly empty)."""
        data = self._carry + data
        whole = len(data) - len(data) % self.frame_bytes
        self._carry = data[whole:]
        if whole == 0:
            return np.zeros(0, np.float32)
        mono = decode_pcm(data[:whole], self.encoding, self.channels)
        self.input_frames += mono.shape[0]
        if self._stream is None:
            return mono
        return self._stream.resample_chunk(mono).astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """The samples still held by the resampler; call once, at the end of the stream."""
        if self._carry:
            raise InvalidRequest(
                f"the stream ended inside a sample frame ({len(self._carry)} of {self.frame_bytes} bytes)"
            )
        if self._stream is None:
            return np.zeros(0, np.float32)
        return self._stream.resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32, copy=False)


def _wav_truncated(data: bytes) -> bool:
    """True when a RIFF/WAVE file's ``data`` chunk claims more bytes than the file holds."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return False
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        if chunk_id == b"data":
            return size not in _UNKNOWN_RIFF_SIZES and pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)
    return False


def _check_length(decoded_frames: int, header_frames: int | None, rate_hz: int) -> None:
    if header_frames and decoded_frames + TRUNCATION_TOLERANCE_S * rate_hz < header_frames:
        raise InvalidRequest(
            f"audio file is truncated or corrupt: its header promises {header_frames} frames, only "
            f"{decoded_frames} could be decoded"
        )


def _check_duration(seconds: float | None, max_duration_s: float | None) -> None:
    # Checked from the header (and while decoding) so a tiny file claiming hours is refused before
    # gigabytes of samples exist.
    if max_duration_s is not None and seconds is not None and seconds > max_duration_s:
        raise InvalidRequest(
            f"audio is {seconds:.1f} s long, over the limit of {max_duration_s:.0f} s; segment longer audio"
        )


def _decode_with_soundfile(data: bytes, max_duration_s: float | None = None) -> tuple[np.ndarray, int] | None:
    """Decode with libsndfile; None when libsndfile does not recognise the container."""
    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except Exception:
        return None
    with handle:
        if handle.channels <= 0:
            raise InvalidRequest("audio has zero channels")
        rate, header_frames = int(handle.samplerate), int(handle.frames)
        _check_duration(header_frames / rate if rate > 0 else None, max_duration_s)
        try:
            samples = handle.read(dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile: "flac decoder lost sync", ...
            raise InvalidRequest(f"audio file is truncated or corrupt: {exc}") from exc
    _check_length(samples.shape[0], header_frames, rate)
    return _to_mono(samples), rate


def _decode_with_av(data: bytes, max_duration_s: float | None = None) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest("the file has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            if not rate or stream.codec_context.channels == 0:
                raise InvalidRequest("the audio stream has no sample rate or zero channels")
            duration_s = container.duration / av.time_base if container.duration else None
            _check_duration(duration_s, max_duration_s)
            chunks = []
            decoded = 0
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    decoded += chunks[-1].shape[0]
                _check_duration(decoded / rate, max_duration_s)  # headers can lie or be missing
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except InvalidRequest:
        raise
    except Exception as exc:  # PyAV raises many error types for corrupt input
        reason = getattr(exc, "strerror", None) or str(exc)  # FFmpeg errors: no errno or file name
        raise InvalidRequest(
            f"cannot decode audio ({reason}); accepted: WAV, FLAC, MP3, OGG (Vorbis, Opus), WebM"
        ) from exc
    if not chunks:
        raise InvalidRequest("the audio stream is empty")
    samples = np.concatenate(chunks).astype(np.float32)
    _check_length(samples.shape[0], round(duration_s * rate) if duration_s else None, int(rate))
    return samples, int(rate)


def decode_audio_file(data: bytes | Path, *, max_duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file to mono float32 at its own rate.

    Args:
        max_duration_s: refuse longer audio, from the header when it tells, else while decoding.

    Returns:
        ``(samples [n] float32 in [-1, 1], sample_rate_hz)``.

    Raises:
        InvalidRequest: see the module docstring.
    """
    if isinstance(data, Path):
        data = data.read_bytes()
    if not data:
        raise InvalidRequest("audio data is empty (0 bytes)")
    if len(data) > MAX_ENCODED_AUDIO_BYTES:
        raise InvalidRequest(f"audio file is {len(data)} bytes; the limit is {MAX_ENCODED_AUDIO_BYTES}")
    if _wav_truncated(data):
        raise InvalidRequest("audio file is truncated: the WAV data chunk is longer than the file")
    decoded = _decode_with_soundfile(data, max_duration_s)
    samples, rate = decoded if decoded is not None else _decode_with_av(data, max_duration_s)
    if samples.size == 0:
        raise InvalidRequest("audio has no samples")
    _check_finite(samples)
    check_sample_rate(rate, param="the file's sample rate")
    return samples, rate


def decode_audio(
    data: bytes | Path,
    target_rate_hz: int,
    *,
    declared_rate_hz: int | None = None,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Decode an encoded audio file to mono float32 ``[samples]`` at ``target_rate_hz``.

    Args:
        declared_rate_hz: when given (not None, not 0), the rate the caller says the file has; a
            file whose header says otherwise is refused.
        max_duration_s: refuse longer audio before decoding all of it (see ``decode_audio_file``).

    Raises:
        InvalidRequest: see the module docstring.
    """
    samples, rate = decode_audio_file(data, max_duration_s=max_duration_s)
    if declared_rate_hz and declared_rate_hz != rate:
        raise InvalidRequest(
            f"declared sample rate {declared_rate_hz} Hz contradicts the file's header ({rate} Hz)",
            param="declared_sample_rate_hz",
        )
    return resample(samples, rate, target_rate_hz)
