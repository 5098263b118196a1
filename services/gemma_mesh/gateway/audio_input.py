"""Live PCM from a client -> mono float32 at the model's rate (soxr streaming resampler).

Matches what ``gemma_mesh.model.audio_io`` does for files (mix down by mean, soxr ``HQ``), but
streaming: chunks of any length, state kept across them, so the output equals resampling the
concatenated input.
"""

from __future__ import annotations

import numpy as np
import soxr

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.gateway.protocol import AudioConfig

_SAMPLE_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4}
_DTYPES = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}


class PcmInput:
    """Decode and resample one session's audio stream.

    Args:
        config: the session's declared encoding, rate and channel count.
        target_rate_hz: the model's rate (16000 for Gemma 4).
        max_chunk_ms: the longest chunk one message may carry (``GatewaySettings.max_audio_chunk_ms``).

    ``samples_in`` counts input frames (per channel) received: the session's audio clock is
    ``samples_in * 1000 / sample_rate_hz`` ms.
    """

    def __init__(self, config: AudioConfig, target_rate_hz: int, max_chunk_ms: int) -> None:
        self.config = config
        self.target_rate_hz = target_rate_hz
        self.frame_bytes = _SAMPLE_BYTES[config.encoding] * config.channels
        self.max_chunk_bytes = self.frame_bytes * config.sample_rate_hz * max_chunk_ms // 1000
        self.samples_in = 0
        self._resampler = (
            None
            if config.sample_rate_hz == target_rate_hz
            else soxr.ResampleStream(config.sample_rate_hz, target_rate_hz, 1, dtype="float32", quality="HQ")
        )

    @property
    def clock_ms(self) -> int:
        """Audio received so far, in ms of the client's stream."""
        return self.samples_in * 1000 // self.config.sample_rate_hz

    def decode(self, payload: bytes) -> np.ndarray:
        """One binary audio payload -> mono float32 samples at ``target_rate_hz`` (shape ``(n,)``).

        Raises:
            InvalidRequest: empty, not a whole number of frames (e.g. an odd byte count for mono
                s16le), longer than ``max_chunk_ms``, or float samples that are not finite.
        """
        n = len(payload)
        if n == 0:
            raise InvalidRequest("empty audio message")
        if n % self.frame_bytes:
            raise InvalidRequest(
                f"audio message of {n} bytes is not a whole number of {self.config.encoding} frames "
                f"({self.frame_bytes} bytes for {self.config.channels} channel(s))"
            )
        if n > self.max_chunk_bytes:
            raise InvalidRequest(
                f"audio message of {n} bytes is longer than the limit of {self.max_chunk_bytes} bytes "
                "(max_audio_chunk_ms)"
            )
        samples = np.frombuffer(payload, dtype=_DTYPES[self.config.encoding])
        if self.config.encoding == "pcm_s16le":
            audio = samples.astype(np.float32) / 32768.0
        else:
            audio = samples.astype(np.float32)
            if not np.isfinite(audio).all():
                raise InvalidRequest("pcm_f32le audio contains NaN or infinite samples")
        if self.config.channels > 1:
            audio = audio.reshape(-1, self.config.channels).mean(axis=1)
        self.samples_in += audio.shape[0]
        if self._resampler is None:
            return audio
        return self._resampler.resample_chunk(audio)

    def flush(self) -> np.ndarray:
        """The resampler's last samples at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
