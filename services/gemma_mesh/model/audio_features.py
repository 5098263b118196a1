"""Log-mel features for the Gemma 4 audio encoder, in numpy only (no torch, no transformers).

`LogMelExtractor` reproduces ``transformers.Gemma4AudioFeatureExtractor`` (transformers 5.23) for
one clip: the same semicausal framing, periodic Hann window, 512-point magnitude FFT, HTK mel
filter bank, ``log(mel + mel_floor)``, right padding to a multiple of 128 samples and the zeroing of
frames that reach into that padding. On the same numpy the outputs are bit-identical.

Two deliberate differences from transformers, both for serving safety:
- audio longer than ``max_length`` samples is refused, never truncated (transformers truncates
  silently); the caller segments long audio (VAD, 30 s windows) before calling.
- empty, non-finite, multi-channel or integer-typed input is refused with `InvalidRequest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemma_mesh.common.errors import InvalidRequest

SAMPLE_RATE_HZ = 16_000
# transformers' Gemma4AudioFeatureExtractor.__call__ defaults (not part of its to_dict()).
DEFAULT_MAX_LENGTH_SAMPLES = 480_000  # 30 s at 16 kHz
PAD_TO_MULTIPLE_OF_SAMPLES = 128
# Gemma4AudioSubSampleConvProjection: two Conv2d layers, kernel 3, stride 2, padding 1 along time.
SUBSAMPLING_LAYERS = 2

# Settings that, when present and not at these values, change the output in ways not ported.
_REQUIRED_VALUES = {"padding_side": "right"}


def hertz_to_mel_htk(freq: float | np.ndarray) -> float | np.ndarray:
    """HTK mel scale: ``2595 * log10(1 + f / 700)`` (transformers.audio_utils.hertz_to_mel, "htk")."""
    return 2595.0 * np.log10(1.0 + (freq / 700.0))


def mel_to_hertz_htk(mels: float | np.ndarray) -> float | np.ndarray:
    """Inverse of `hertz_to_mel_htk` (transformers.audio_utils.mel_to_hertz, "htk")."""
    return 700.0 * (np.power(10, mels / 2595.0) - 1.0)


def mel_filter_bank_htk(
    num_frequency_bins: int,
    num_mel_filters: int,
    min_frequency_hz: float,
    max_frequency_hz: float,
    sampling_rate_hz: int,
) -> np.ndarray:
    """Triangular HTK mel filters, no area normalisation, float64 ``[num_frequency_bins, num_mel_filters]``.

    Port of ``transformers.audio_utils.mel_filter_bank(norm=None, mel_scale="htk",
    triangularize_in_mel_space=False)``. With Gemma 4's 257 bins and 128 filters the *lowest*
    filter (0 to 28 Hz, centred on 14 Hz; FFT bins are 31.25 Hz apart) is all zeros, so mel channel 0 is
    always ``log(mel_floor)``; transformers keeps it (its comment says "uppermost"), so do we.
    """
    if num_frequency_bins < 2:
        raise ValueError(f"num_frequency_bins must be >= 2, got {num_frequency_bins}")
    if min_frequency_hz > max_frequency_hz:
        raise ValueError(f"min_frequency {min_frequency_hz} Hz exceeds max_frequency {max_frequency_hz} Hz")
    mel_freqs = np.linspace(
        hertz_to_mel_htk(min_frequency_hz), hertz_to_mel_htk(max_frequency_hz), num_mel_filters + 2
    )
    filter_freqs = mel_to_hertz_htk(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate_hz // 2, num_frequency_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes)).astype(np.float64, copy=False)


def periodic_hann_window(window_length: int) -> np.ndarray:
    """Periodic Hann window, float64 ``[window_length]`` (transformers.audio_utils.window_function)."""
    return np.hanning(window_length + 1)[:-1]


def _as_float(value: Any) -> float:
    return float(np.asarray(value))


@dataclass(frozen=True)
class LogMelSettings:
    """The feature-extractor settings of a checkpoint (its processor config, audio part)."""

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE_HZ
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    padding_value: float = 0.0
    max_length: int = DEFAULT_MAX_LENGTH_SAMPLES
    audio_seq_length: int | None = None


class LogMelExtractor:
    """Waveform -> Gemma 4 log-mel features; matches ``transformers.Gemma4AudioFeatureExtractor``.

    Attributes:
        frame_length: analysis window in samples (320 at 16 kHz / 20 ms).
        hop_length: frame step in samples (160 at 16 kHz / 10 ms).
        fft_length: FFT size in samples (512).
        mel_filters: float64 ``[fft_length // 2 + 1, feature_size]``.
    """

    def __init__(self, settings: LogMelSettings | None = None) -> None:
        s = settings or LogMelSettings()
        self.settings = s
        self.frame_length = round(s.sampling_rate * s.frame_length_ms / 1000.0)
        self.hop_length = round(s.sampling_rate * s.hop_length_ms / 1000.0)
        if self.frame_length < 2 or self.hop_length < 1:
            raise ValueError(
                f"frame_length {self.frame_length} / hop_length {self.hop_length} samples too small"
            )
        fft_length = 2 ** math.ceil(math.log2(self.frame_length))
        self.fft_length = fft_length * 2 if s.fft_overdrive else fft_length
        self.window = periodic_hann_window(self.frame_length).astype(np.float32)
        self.mel_filters = mel_filter_bank_htk(
            self.fft_length // 2 + 1, s.feature_size, s.min_frequency, s.max_frequency, s.sampling_rate
        )
        self.mel_floor = np.array(s.mel_floor, dtype=np.float64)
        self.per_bin_mean = self._per_bin(s.per_bin_mean, "per_bin_mean")
        self.per_bin_stddev = self._per_bin(s.per_bin_stddev, "per_bin_stddev")
        self._rng = np.random.default_rng()

    def _per_bin(self, values: tuple[float, ...] | None, name: str) -> np.ndarray | None:
        if values is None:
            return None
        if len(values) != self.settings.feature_size:
            raise ValueError(
                f"{name} has {len(values)} values, expected feature_size={self.settings.feature_size}"
            )
        return np.array(values).reshape(1, 1, self.settings.feature_size)

    @classmethod
    def from_settings(cls, d: dict[str, Any], *, audio_seq_length: int | None = None) -> LogMelExtractor:
        """Build from a checkpoint's feature-extractor dict (``Gemma4AudioFeatureExtractor().to_dict()``).

        ``audio_seq_length`` (the processor's cap on audio soft tokens, 750 for Gemma 4) may come
        from the argument or from an ``audio_seq_length`` key. The derived keys ``frame_length``,
        ``hop_length`` and ``fft_length`` (samples) must agree with the millisecond settings.
        Keys that do not affect the features (``feature_extractor_type``, ``return_attention_mask``,
        ...) are ignored. Raises ValueError on inconsistent or unsupported values (a bundle error,
        not a request error).
        """
        fields = set(LogMelSettings.__dataclass_fields__)
        for key, required in _REQUIRED_VALUES.items():
            if d.get(key, required) != required:
                raise ValueError(f"{key} must be {required!r}, got {d[key]!r}")
        kw: dict[str, Any] = {k: d[k] for k in fields & set(d) if d[k] is not None}
        for key in (
            "mel_floor",
            "dither",
            "preemphasis",
            "input_scale_factor",
            "padding_value",
            "min_frequency",
            "max_frequency",
            "frame_length_ms",
            "hop_length_ms",
        ):
            if key in kw:
                kw[key] = _as_float(kw[key])
        for key in ("per_bin_mean", "per_bin_stddev"):
            if key in kw:
                kw[key] = tuple(float(v) for v in np.asarray(kw[key]).reshape(-1))
        if d.get("max_length") is not None:
            kw["max_length"] = int(d["max_length"])
        seq = audio_seq_length if audio_seq_length is not None else d.get("audio_seq_length")
        kw["audio_seq_length"] = None if seq is None else int(seq)
        extractor = cls(LogMelSettings(**kw))
        for key in ("frame_length", "hop_length", "fft_length"):
            if key in d and int(d[key]) != getattr(extractor, key):
                raise ValueError(f"{key}={d[key]} disagrees with the derived value {getattr(extractor, key)}")
        return extractor

    # ----------------------------------------------------------------- validation and framing
    def _validate(self, waveform: np.ndarray) -> np.ndarray:
        max_length = self.settings.max_length
        wav = np.asarray(waveform)
        if wav.ndim != 1:
            raise InvalidRequest(f"audio must be one mono channel (a 1-D array), got shape {wav.shape}")
        if not np.issubdtype(wav.dtype, np.floating):
            raise InvalidRequest(f"audio samples must be floating point in [-1, 1], got dtype {wav.dtype}")
        if wav.shape[0] == 0:
            raise InvalidRequest("audio is empty (0 samples)")
        if wav.shape[0] > max_length:
            rate = self.settings.sampling_rate
            raise InvalidRequest(
                f"audio has {wav.shape[0]} samples ({wav.shape[0] / rate:.2f} s), more than the limit of "
                f"{max_length} samples ({max_length / rate:.0f} s at {rate} Hz); segment it into clips of "
                "at most that length"
            )
        wav = wav.astype(np.float32, copy=False)
        if not np.isfinite(wav).all():
            raise InvalidRequest("audio contains NaN or infinite samples")
        return wav

    def padded_length(self, num_samples: int) -> int:
        """Samples after right padding to a multiple of 128 (what transformers' ``pad`` produces)."""
        m = PAD_TO_MULTIPLE_OF_SAMPLES
        return num_samples if num_samples % m == 0 else (num_samples // m + 1) * m

    def num_frames(self, num_samples: int) -> int:
        """Mel frames T for a clip of ``num_samples`` (including fully padded frames); 0 if too short."""
        padded = self.padded_length(num_samples) + self.frame_length // 2
        return max(0, (padded - (self.frame_length + 1)) // self.hop_length + 1)

    def frame_mask(self, num_samples: int) -> np.ndarray:
        """bool ``[T]``: frame i is valid when its whole window lies in real (unpadded) audio."""
        pad_left = self.frame_length // 2
        ends = np.arange(self.num_frames(num_samples)) * self.hop_length + self.frame_length
        return ends < num_samples + pad_left

    # --------------------------------------------------------------------------- public API
    def __call__(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-mel features of one clip.

        Args:
            waveform: mono samples at ``sampling_rate`` (16 kHz), floating point (cast to float32),
                nominally in [-1, 1], 1 to ``max_length`` samples.

        Returns:
            ``(input_features, input_features_mask)``: float32 ``[T, feature_size]`` natural-log mel
            magnitudes (frames reaching into the padding are zero) and bool ``[T]`` (True = real
            frame), where ``T = (ceil128(N) + frame_length // 2 - frame_length - 1) // hop_length + 1``
            (0 for N < 161 + ...; e.g. 1 sample -> T = 0). Equal to row 0 of
            ``Gemma4AudioFeatureExtractor(...)([waveform], return_tensors="np")``.

        Raises:
            InvalidRequest: empty, too long, not 1-D, not floating point, NaN or infinite samples.
        """
        s = self.settings
        wav = self._validate(waveform)
        num_samples = wav.shape[0]
        padded = np.full(self.padded_length(num_samples), s.padding_value, dtype=np.float32)
        padded[:num_samples] = wav
        x = padded[None, :]
        if s.dither > 0.0:
            x = x + s.dither * self._rng.standard_normal(x.shape).astype(x.dtype)
        if s.input_scale_factor != 1.0:
            x = x * s.input_scale_factor
        x = np.pad(x, ((0, 0), (self.frame_length // 2, 0)), mode="constant")
        size = self.frame_length + 1
        num_frames = (x.shape[1] - size) // self.hop_length + 1
        if num_frames <= 0:
            return np.zeros((0, s.feature_size), np.float32), np.zeros((0,), bool)
        frames_ext = np.lib.stride_tricks.as_strided(
            x,
            shape=(1, num_frames, size),
            strides=(x.strides[0], x.strides[1] * self.hop_length, x.strides[1]),
        )
        if s.preemphasis > 0.0:
            if s.preemphasis_htk_flavor:
                first = frames_ext[..., :1] * (1.0 - s.preemphasis)
                rest = frames_ext[..., 1:-1] - s.preemphasis * frames_ext[..., :-2]
                frames = np.concatenate([first, rest], axis=-1)
            else:
                frames = frames_ext[..., 1:] - s.preemphasis * frames_ext[..., :-1]
        else:
            frames = frames_ext[..., :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(np.matmul(spectrum, self.mel_filters) + self.mel_floor)
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        features = log_mel[0].astype(np.float32)
        mask = self.frame_mask(num_samples)
        return features * mask[:, None], mask

    def num_soft_tokens(self, num_samples: int) -> int:
        """Audio placeholder tokens for a clip of ``num_samples`` samples.

        Equals ``Gemma4Processor.replace_audio_token``: the frame mask subsampled by two stride-2
        convolutions (kernel 3, padding 1), counting valid positions; capped at ``audio_seq_length``
        when set (750 for Gemma 4: a 30 s clip gives exactly 750). 0 for clips shorter than one
        full analysis window (< 161 samples).
        """
        if num_samples < 0:
            raise InvalidRequest(f"num_samples must be >= 0, got {num_samples}")
        mask = self.frame_mask(num_samples)
        for _ in range(SUBSAMPLING_LAYERS):
            t_out = (len(mask) + 2 - 3) // 2 + 1
            mask = mask[::2][:t_out]
        count = int(mask.sum())
        cap = self.settings.audio_seq_length
        return count if cap is None else min(count, cap)
