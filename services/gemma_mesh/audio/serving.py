"""The audio frontend's logic, free of gRPC: bytes in, soft tokens (numpy) out.

`AudioEngine` wraps a `ModelBundle`: it decodes PCM or files to mono 16 kHz float32 (`audio_io`),
refuses clips over the manifest's limit (30 s) unless asked to split them at the quietest points
(`splitting`), encodes clips whole (``ModelBundle.encode_audio``) and opens incremental streams
(`streaming`). Errors are ``InvalidRequest`` / ``Overloaded`` values for the servicer to map.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np

from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.audio.splitting import split_points
from gemma_mesh.audio.streaming import (
    IncrementalAudioEncoder,
    ReceptiveField,
    TokenBlock,
    check_receptive_field,
    check_subsampling_field,
)
from gemma_mesh.common.errors import InvalidRequest, Overloaded
from gemma_mesh.common.logging import get_logger
from gemma_mesh.model.audio_io import (
    PcmStreamDecoder,
    check_sample_rate,
    decode_audio,
    decode_pcm,
    resample,
)
from gemma_mesh.model.bundle import ModelBundle

log = get_logger("audio")

# When a long clip is split, no piece is shorter than this (a cut never leaves a sliver at the end).
MIN_SPLIT_PIECE_S = 1


@dataclass(frozen=True)
class EncodedSegment:
    """Soft tokens ``[n, H]`` (the bundle's float dtype) of the audio in ``[start_ms, end_ms)``."""

    tokens: np.ndarray
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class EncodedClip:
    """One Encode result: one segment, or several when a long clip was split."""

    segments: list[EncodedSegment]
    audio_seconds: float


def _ms(samples: int, rate_hz: int) -> int:
    return round(samples * 1000 / rate_hz)


class AudioEngine:
    """Decoding, limits, whole-clip and incremental encoding on one bundle.

    Args:
        bundle: a bundle with the ``audio_subsample`` and ``audio_conformer`` graphs and the
            checkpoint's ``config.json``.
        settings: the service's `AudioSettings`.

    Raises:
        ValueError: the bundle lacks the audio graph or its audio config, or (with
            ``settings.verify_streaming``) the encoder's receptive field does not match the code.
    """

    def __init__(self, bundle: ModelBundle, settings: AudioSettings) -> None:
        for graph in ("audio_subsample", "audio_conformer"):
            if graph not in bundle.manifest.graphs:
                raise ValueError(f"bundle {bundle.path} has no {graph} graph")
        config = json.loads((bundle.path / "config.json").read_text(encoding="utf-8"))
        if "audio_config" not in config:
            raise ValueError(f"bundle {bundle.path} config.json has no audio_config")
        self.bundle = bundle
        self.settings = settings
        audio = bundle.manifest.audio
        self.rate_hz = audio.sampling_rate
        self.max_samples = audio.max_samples
        self.ms_per_token = audio.ms_per_token
        self.field = ReceptiveField.from_audio_config(config["audio_config"])
        if settings.stream_window_tokens <= self.field.left_context_tokens + self.field.chunk_tokens:
            raise ValueError(
                f"stream_window_tokens={settings.stream_window_tokens} must exceed the encoder's left context "
                f"{self.field.left_context_tokens} + chunk {self.field.chunk_tokens} tokens"
            )
        self._streams = 0
        self._lock = threading.Lock()
        # Session creation and the first run of both graphs happen here, not in the first request.
        err = None
        if settings.verify_streaming:
            rel_tol = 1e-3 if bundle.float_dtype == np.float32 else 3e-2
            err = max(
                check_subsampling_field(
                    self.field, self.subsample_window, audio.feature_size, rel_tol=rel_tol
                ),
                check_receptive_field(self.field, self.encode_window, audio.feature_size, rel_tol=rel_tol),
            )
        if err is None:  # the check above ran both graphs; without it, one clip does
            self.encode_clip(np.zeros(self.rate_hz, dtype=np.float32))
        log.info("audio engine ready", receptive_field=str(self.field), streaming_check_rel_err=err)

    # --------------------------------------------------------------------------- decoding
    def samples_from_pcm(self, data: bytes, encoding: str, rate_hz: int, channels: int) -> np.ndarray:
        """Raw PCM -> mono float32 at 16 kHz. Raises InvalidRequest (see ``audio_io.decode_pcm``)."""
        check_sample_rate(rate_hz)
        return resample(decode_pcm(data, encoding, channels), rate_hz, self.rate_hz)

    def samples_from_file(self, data: bytes, declared_rate_hz: int = 0) -> np.ndarray:
        """An encoded file -> mono float32 at 16 kHz; a nonzero ``declared_rate_hz`` must match its header.

        Files longer than ``max_split_audio_s`` are refused from their header, before decoding.

        Raises:
            InvalidRequest: see ``audio_io.decode_audio``.
        """
        return decode_audio(
            data,
            self.rate_hz,
            declared_rate_hz=declared_rate_hz or None,
            max_duration_s=max(
                self.settings.max_split_audio_s, self.bundle.manifest.audio.max_samples / self.rate_hz
            ),
        )

    # --------------------------------------------------------------------------- encoding
    def subsample_window(self, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-mel ``[T, F]`` + mask ``[T]`` (``T`` a multiple of 4) -> embeddings ``[T / 4, Ha]`` + mask
        ``[T / 4]`` (the ``audio_subsample`` graph on one window)."""
        embeddings, token_mask = self.bundle.audio_subsample(features[None], mask[None])
        return embeddings[0], token_mask[0]

    def conform_window(self, embeddings: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Embeddings ``[U, Ha]`` + mask ``[U]`` -> soft tokens ``[U, H]`` (the ``audio_conformer`` graph;
        the window is padded with masked tokens to whole attention chunks, which changes no valid token)."""
        tokens = embeddings.shape[0]
        padded = tokens + -tokens % (self.bundle.manifest.audio.frames_multiple // 4)
        batch = np.zeros((1, padded, embeddings.shape[1]), dtype=embeddings.dtype)
        batch_mask = np.zeros((1, padded), dtype=bool)
        batch[0, :tokens] = embeddings
        batch_mask[0, :tokens] = mask
        return self.bundle.audio_conformer(batch, batch_mask)[0, :tokens]

    def encode_window(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Log-mel ``[T, F]`` + mask ``[T]`` -> soft tokens ``[ceil(T / 4), H]`` (no 750-token cap)."""
        frames = features.shape[0]
        frames += -frames % self.bundle.manifest.audio.frames_multiple
        batch = np.zeros((frames, features.shape[1]), dtype=self.bundle.float_dtype)
        batch_mask = np.zeros(frames, dtype=bool)
        batch[: features.shape[0]] = features
        batch_mask[: mask.shape[0]] = mask
        return self.conform_window(*self.subsample_window(batch, batch_mask))[: -(-features.shape[0] // 4)]

    def encode_clip(self, samples: np.ndarray, *, split_long_audio: bool = False) -> EncodedClip:
        """Mono 16 kHz float32 ``[n]`` -> soft tokens, split at the quietest points when asked.

        Raises:
            InvalidRequest: empty audio; over the manifest's limit (30 s) without ``split_long_audio``;
                over ``max_split_audio_s`` with it.
        """
        n = int(samples.shape[0])
        if n == 0:
            raise InvalidRequest("audio is empty (0 samples)")
        limit_s = self.max_samples / self.rate_hz
        if n > self.max_samples and not split_long_audio:
            raise InvalidRequest(
                f"audio is {n / self.rate_hz:.2f} s long, more than the limit of {limit_s:g} s per clip "
                f"({self.max_samples} samples at {self.rate_hz} Hz); set split_long_audio to split it at "
                "the quietest points, or stream it with EncodeStream",
                param="split_long_audio",
            )
        if n > self.settings.max_split_audio_s * self.rate_hz:
            raise InvalidRequest(
                f"audio is {n / self.rate_hz:.2f} s long, more than the limit of "
                f"{self.settings.max_split_audio_s:g} s for a split clip; stream it with EncodeStream"
            )
        pieces = split_points(
            samples,
            self.rate_hz,
            self.max_samples,
            self.settings.split_search_s,
            min_piece_samples=MIN_SPLIT_PIECE_S * self.rate_hz,
        )
        segments = [
            EncodedSegment(self.bundle.encode_audio(samples[a:b]), _ms(a, self.rate_hz), _ms(b, self.rate_hz))
            for a, b in pieces
        ]
        return EncodedClip(segments, n / self.rate_hz)

    # --------------------------------------------------------------------------- streaming
    def open_stream(
        self, encoding: str, rate_hz: int, channels: int, *, provisional_tail: bool = False
    ) -> AudioStream:
        """A new incremental stream (with ``provisional_tail``, each push also returns the tokens after
        the final ones as the clip so far ends: ``IncrementalAudioEncoder.step(tail=True)``).

        Raises:
            Overloaded: past ``max_streams``. InvalidRequest: a bad config.
        """
        decoder = PcmStreamDecoder(encoding, rate_hz, channels, self.rate_hz)
        with self._lock:
            if self._streams >= self.settings.max_streams:
                raise Overloaded(
                    f"{self._streams} streams are open, the limit is {self.settings.max_streams}"
                )
            self._streams += 1
        encoder = IncrementalAudioEncoder(
            self.field,
            self.bundle.log_mel,
            self.subsample_window,
            self.conform_window,
            ms_per_token=self.ms_per_token,
            sample_rate_hz=self.rate_hz,
            max_window_tokens=self.settings.stream_window_tokens,
            rewind_tokens=-(-self.settings.stream_rewind_ms // self.ms_per_token),
        )
        return AudioStream(self, decoder, encoder, provisional_tail=provisional_tail)

    def _close_stream(self) -> None:
        with self._lock:
            self._streams -= 1


class AudioStream:
    """One EncodeStream call: PCM bytes in (`push`), final soft-token blocks out; `close` when done."""

    def __init__(
        self,
        engine: AudioEngine,
        decoder: PcmStreamDecoder,
        encoder: IncrementalAudioEncoder,
        *,
        provisional_tail: bool = False,
    ):
        self._engine = engine
        self.decoder = decoder
        self.encoder = encoder
        self.provisional_tail = provisional_tail
        self._closed = False

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio received so far (at the model's rate)."""
        return self.encoder.total_samples / self._engine.rate_hz

    def push(self, data: bytes) -> list[TokenBlock]:
        """Decode one PCM chunk and encode the tokens that became final.

        Raises:
            InvalidRequest: a chunk over ``max_stream_chunk_bytes``, non-finite samples, or more than
                ``max_stream_s`` of audio in total.
        """
        limit = self._engine.settings.max_stream_chunk_bytes
        if len(data) > limit:
            raise InvalidRequest(f"PCM chunk is {len(data)} bytes, more than the limit of {limit}")
        self.encoder.insert(self.decoder.push(data))
        max_s = self._engine.settings.max_stream_s
        if self.audio_seconds > max_s:
            raise InvalidRequest(f"the stream carries more than the limit of {max_s:g} s of audio")
        return self.encoder.step(tail=self.provisional_tail)

    def finish(self, end_samples: int | None = None) -> list[TokenBlock]:
        """End of input: the remaining tokens, computed as for the whole clip; the clip is the first
        ``end_samples`` samples (at the stream's input rate) when given (``AudioStreamEnd``).

        Raises:
            InvalidRequest: ``end_samples`` negative, past the PCM sent, or further back than
                ``stream_rewind_ms``.
        """
        self.encoder.insert(self.decoder.flush())
        if end_samples is None:
            return self.encoder.finish()
        if end_samples < 0:
            raise InvalidRequest(f"end.samples must be >= 0, got {end_samples}", param="end.samples")
        model_samples = round(end_samples * self._engine.rate_hz / self.decoder.rate_hz)
        try:
            return self.encoder.finish(model_samples)
        except ValueError as error:
            raise InvalidRequest(f"end.samples: {error}", param="end.samples") from None

    def close(self) -> None:
        """Release the stream's slot (idempotent)."""
        if not self._closed:
            self._closed = True
            self._engine._close_stream()
