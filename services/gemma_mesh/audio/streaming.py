"""Incremental Gemma 4 audio encoding: a pure policy, with the log-mel extractor and encoder injected.

Why it works. The Gemma 4 audio tower (``transformers`` ``Gemma4AudioModel``) is causal per soft token:

- log-mel frame ``i`` (hop 160, window 320 samples, semicausal: 160 zeros on the left) reads samples
  ``[160 i - 160, 160 i + 160]`` and is valid once the clip holds sample ``160 i + 160``; once valid it
  never changes;
- the two subsampling convs (kernel 3, stride 2, padding 1) make token ``u`` read frames
  ``4u - 3 .. 4u + 3``: 3 frames of lookahead, 1 token of left context;
- each of the conformer layers adds ``attention_context_left - 2`` tokens of left context (the mask is a
  causal sliding window: itself plus 11 past tokens; ``attention_context_right`` must be 0) and
  ``conv_kernel_size - 1`` tokens (causal depthwise conv), and nothing on the right.

So token ``u`` is final once frame ``4u + 3`` is, and it depends on at most ``left_context_tokens``
earlier tokens (31 for the tiny model, 181 for E4B's 12 layers = 7.24 s). The bundle exports the
encoder as two graphs, so each step does two bounded pieces of work:

- the subsampling (``audio_subsample``) runs on the new tokens' frames only, from one token before
  the first new one (its left context), and the embeddings are cached;
- the conformer (``audio_conformer``) runs on the cached embeddings of a window that starts
  ``left_context_tokens`` before the first new token, rounded down to a multiple of the attention
  chunk (12 tokens, so the blocked attention sees the same block layout as the whole clip), and
  only the new tokens are kept.

Work per step is bounded by the window, never the whole utterance; the convolutions, the costly
part on small towers, are not recomputed for the window's left context.
``finish`` encodes the tail the way the whole clip does (frames past the end zeroed and masked).
``finish(num_samples)`` ends the clip earlier than the samples inserted (a live caption's segment
ends in the silence after the speech, after its partials fed the encoder past that point): the
tokens that read frames past the new end are encoded again, as the whole shorter clip would, which
needs the features of their window; they are kept for ``rewind_tokens`` tokens behind the newest.
`check_receptive_field` and `check_subsampling_field` verify all this against the real graphs at startup.

API (whisper_streaming's push/pull): ``insert(samples)``, ``step() -> [TokenBlock]``,
``finish(num_samples=None) -> [TokenBlock]``, ``reset()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Gemma4AudioSubSampleConvProjection: two stride-2 convs -> 4 frames per token; kernel 3 + padding 1
# -> token u reads frames 4u-3 .. 4u+3.
FRAMES_PER_TOKEN = 4
LOOKAHEAD_FRAMES = 3
SUBSAMPLING_LEFT_TOKENS = 1
# Frames computed per log-mel call when catching up on a long chunk (bounds one call's memory).
MAX_FRAMES_PER_EXTRACT = 1_000


class LogMel(Protocol):
    """What the policy needs of ``LogMelExtractor``: framing geometry and ``__call__``."""

    hop_length: int
    frame_length: int

    def __call__(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# features float32 [T, F], mask bool [T] (T a multiple of 4) -> soft tokens float [T / 4, H]
EncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# features float32 [T, F], mask bool [T] (T a multiple of 4) -> embeddings [T / 4, Ha], mask bool [T / 4]
SubsampleFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
# embeddings [U, Ha], mask bool [U] -> soft tokens float [U, H]
ConformFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ReceptiveField:
    """How far one soft token reaches into the audio, in tokens and frames.

    Attributes:
        left_context_tokens: earlier tokens that can change a token's value.
        chunk_tokens: the conformer's attention block; windows start on multiples of it.
        frames_per_token: mel frames per token (4).
        lookahead_frames: frames after ``frames_per_token * u`` that token ``u`` reads (3).
    """

    left_context_tokens: int
    chunk_tokens: int
    frames_per_token: int = FRAMES_PER_TOKEN
    lookahead_frames: int = LOOKAHEAD_FRAMES

    @classmethod
    def from_audio_config(cls, config: dict[str, Any]) -> ReceptiveField:
        """From a checkpoint's ``audio_config`` (config.json). Raises ValueError if it is not causal."""
        if int(config.get("attention_context_right", 0)) != 0:
            raise ValueError(
                "the audio encoder attends to future tokens; incremental encoding is unsupported"
            )
        layers = int(config["num_hidden_layers"])
        attention_past = int(config["attention_context_left"]) - 2
        conv_past = int(config["conv_kernel_size"]) - 1
        return cls(
            left_context_tokens=SUBSAMPLING_LEFT_TOKENS + layers * (attention_past + conv_past),
            chunk_tokens=int(config["attention_chunk_size"]),
        )

    def window_start(self, first_new_token: int) -> int:
        """First token of the window that encodes ``first_new_token`` exactly."""
        start = max(0, first_new_token - self.left_context_tokens)
        return start - start % self.chunk_tokens


@dataclass(frozen=True)
class TokenBlock:
    """Soft tokens ``[first_token, first_token + n)`` that will not change.

    Attributes:
        tokens: float ``[n, H]``.
        first_token: absolute index of the first token since the stream began.
        start_ms / end_ms: media time the tokens cover (``ms_per_token`` each; the last block of a
            stream ends at the end of the audio).
        provisional: the tokens after the final ones, computed as if the stream ended at the last
            sample inserted (``step(tail=True)``); the next block starts at or before its
            ``first_token`` and replaces it.
    """

    tokens: np.ndarray
    first_token: int
    start_ms: int
    end_ms: int
    provisional: bool = False  # a tail as if the stream ended now: the next block replaces it


class IncrementalAudioEncoder:
    """Mono 16 kHz samples in, final soft tokens out; equal to encoding the whole clip at once.

    Args:
        field: the encoder's `ReceptiveField`.
        log_mel: a ``LogMelExtractor`` (deterministic: ``dither`` must be 0).
        subsample: features ``[T, F]`` + mask ``[T]`` (``T`` a multiple of 4) -> embeddings
            ``[T / 4, Ha]`` + mask ``[T / 4]`` (the ``audio_subsample`` graph, one clip).
        conform: embeddings ``[U, Ha]`` + mask ``[U]`` -> tokens ``[U, H]`` (the ``audio_conformer``
            graph, one clip, any ``U``).
        ms_per_token: media milliseconds per soft token (manifest ``audio.ms_per_token``).
        sample_rate_hz: rate of the inserted samples (the extractor's, 16 kHz).
        max_window_tokens: most tokens passed to ``conform`` (and subsampled) in one call; must
            exceed ``left_context_tokens + chunk_tokens``.
        rewind_tokens: how many tokens before the newest ``finish(num_samples)`` may end the clip
            (the embeddings of their window and the features of their tokens are kept).
    """

    def __init__(
        self,
        field: ReceptiveField,
        log_mel: LogMel,
        subsample: SubsampleFn,
        conform: ConformFn,
        *,
        ms_per_token: int,
        sample_rate_hz: int,
        max_window_tokens: int,
        rewind_tokens: int = 0,
    ) -> None:
        if max_window_tokens <= field.left_context_tokens + field.chunk_tokens:
            raise ValueError(
                f"max_window_tokens={max_window_tokens} must exceed the left context "
                f"{field.left_context_tokens} + chunk {field.chunk_tokens}"
            )
        self.field = field
        self.log_mel = log_mel
        self.subsample = subsample
        self.conform = conform
        self.ms_per_token = ms_per_token
        self.sample_rate_hz = sample_rate_hz
        self.max_window_tokens = max_window_tokens
        self.rewind_tokens = rewind_tokens
        self.hop = log_mel.hop_length
        self.frame_length = log_mel.frame_length
        self.pad_left = log_mel.frame_length // 2
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next sample is the start of a new stream."""
        self.total_samples = 0
        self.emitted_tokens = 0
        # Work per step: the most frames subsampled and tokens conformed in one call.
        self.max_subsample_frames = 0
        self.max_conformer_tokens = 0
        self._width = 0  # the encoder's output width, once it has run
        self._samples = np.zeros(0, np.float32)
        self._sample0 = 0  # absolute index of _samples[0]
        self._features: np.ndarray | None = None
        self._frame0 = 0  # absolute index of _features[0]
        self._frames = 0  # final frames computed so far
        self._embeddings: np.ndarray | None = None  # subsampled tokens [_token0, emitted_tokens)
        self._embeddings_mask = np.zeros(0, bool)
        self._token0 = 0  # absolute index of _embeddings[0]
        self._provisional_from: int | None = None  # first token of the last provisional tail sent

    # ------------------------------------------------------------------------------ geometry
    def final_frames(self, num_samples: int) -> int:
        """Frames whose whole window lies in the first ``num_samples`` samples (``LogMelExtractor.frame_mask``)."""
        need = self.frame_length - self.pad_left  # frame i valid iff hop * i + need < num_samples
        return max(0, -(-(num_samples - need) // self.hop))

    def final_tokens(self, frames: int) -> int:
        """Tokens whose frames (lookahead included) are all among the first ``frames``."""
        f = self.field
        return max(0, (frames - f.lookahead_frames - 1) // f.frames_per_token + 1)

    def end_tokens(self, frames: int) -> int:
        """Tokens of a clip that ends after ``frames`` frames (whole-clip count, uncapped)."""
        return -(-frames // self.field.frames_per_token)

    @property
    def buffered_samples(self) -> int:
        """Samples held for the next log-mel frames (bounded by a chunk plus one window)."""
        return int(self._samples.shape[0])

    @property
    def buffered_frames(self) -> int:
        """Log-mel frames held for the next subsampling (bounded by a step plus the rewind)."""
        return 0 if self._features is None else int(self._features.shape[0])

    @property
    def buffered_tokens(self) -> int:
        """Subsampled embeddings held for the next conformer window (bounded by the receptive field)."""
        return 0 if self._embeddings is None else int(self._embeddings.shape[0])

    # ------------------------------------------------------------------------------- policy
    def insert(self, samples: np.ndarray) -> None:
        """Append mono float32 samples at the extractor's rate (16 kHz)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size:
            self._samples = np.concatenate([self._samples, samples])
            self.total_samples += samples.shape[0]

    def step(self, *, tail: bool = False) -> list[TokenBlock]:
        """Encode every token that became final since the last call; [] when none did.

        With ``tail``, also the tokens after them as the whole clip of the samples inserted so far
        would end (frames past the end masked, as ``finish``), in a last block marked
        ``provisional``: a live caption's partial then covers every sample received, not just the
        final tokens (those stop ~40-70 ms short of the audio: the convolutions' lookahead). The
        tail shares the last conformer run (it comes after the final tokens, which it cannot
        change: the conformer is causal); only its 1-2 embeddings are subsampled apart and not kept.
        When every token is final the tail is empty, its ``end_ms`` still the end of the audio.
        """
        self._extend_features()
        upto = self.final_tokens(self._frames)
        end = self.end_tokens(self._frames) if tail else upto
        blocks = self._emit(upto, at_end=False, tail_end=end)
        if tail and end == upto and self._width:  # every token is final: an empty tail says so
            end_ms = round(self.total_samples * 1000 / self.sample_rate_hz)
            empty = np.zeros((0, self._width), np.float32)
            blocks.append(TokenBlock(empty, upto, upto * self.ms_per_token, end_ms, provisional=True))
            self._provisional_from = upto
        return blocks

    def finish(self, num_samples: int | None = None) -> list[TokenBlock]:
        """End of stream: encode the remaining tokens as the whole clip would (frames past the end masked).

        ``num_samples`` (at most the samples inserted) ends the clip there instead: tokens already
        emitted that read frames past that end are emitted again, from their ``first_token`` (a
        block may start before ``emitted_tokens``), and tokens past the shorter clip's last are
        dropped (an empty block at that token says so when nothing is re-encoded). Keeping, for
        each block, the tokens before its ``first_token`` and then its own gives the first
        ``num_samples`` samples' whole-clip encoding.

        Raises:
            ValueError: ``num_samples`` beyond the samples inserted, or more than ``rewind_tokens``
                tokens before the newest emitted one (their features were dropped).
        """
        self._extend_features()
        emitted = self.emitted_tokens
        if num_samples is not None and num_samples != self.total_samples:
            self._truncate(num_samples)
        blocks = self._emit(self.end_tokens(self._frames), at_end=True)
        tail = self._provisional_from
        replaced = tail is None or (blocks and blocks[0].first_token <= tail)
        if (self.emitted_tokens < emitted or not replaced) and not blocks:
            # tokens dropped (or a provisional tail sent), none re-encoded: say where it ends
            end_ms = round(self.total_samples * 1000 / self.sample_rate_hz)
            empty = np.zeros((0, self._width), np.float32)
            blocks = [TokenBlock(empty, self.emitted_tokens, self.emitted_tokens * self.ms_per_token, end_ms)]
        return blocks

    def _truncate(self, num_samples: int) -> None:
        if not 0 <= num_samples <= self.total_samples:
            raise ValueError(
                f"the stream cannot end at sample {num_samples}: {self.total_samples} samples were inserted"
            )
        frames = self.final_frames(num_samples)
        keep = min(self.emitted_tokens, self.final_tokens(frames))  # tokens whose frames all precede the end
        if keep < self.emitted_tokens and (
            self.field.window_start(keep) < self._token0
            or self.field.frames_per_token * max(0, keep - SUBSAMPLING_LEFT_TOKENS) < self._frame0
        ):
            raise ValueError(
                f"the stream cannot end at sample {num_samples}: it is {self.emitted_tokens - keep} tokens "
                f"before the newest, more than the {self.rewind_tokens} kept for rewinding"
            )
        if self._features is not None and frames < self._frames:
            self._features = self._features[: max(0, frames - self._frame0)]
        if self._embeddings is not None:  # embeddings that read frames past the new end go
            self._embeddings = self._embeddings[: max(0, keep - self._token0)]
            self._embeddings_mask = self._embeddings_mask[: max(0, keep - self._token0)]
        self._frames = min(self._frames, frames)
        self.total_samples = num_samples
        self.emitted_tokens = keep

    # ------------------------------------------------------------------------------ helpers
    def _extend_features(self) -> None:
        """Compute log-mel frames that became final, in bounded pieces; drop samples no longer needed."""
        target = self.final_frames(self.total_samples)
        while self._frames < target:
            a = self._frames
            b = min(target, a + MAX_FRAMES_PER_EXTRACT)
            first = max(0, a - 1)  # frame a-1's window starts where frame a's left half does
            start = self.hop * first
            end = min(self.total_samples, self.hop * (b - 1) - self.pad_left + self.frame_length + 1)
            feats, mask = self.log_mel(self._samples[start - self._sample0 : end - self._sample0])
            skip = a - first  # sub-call frame 0 sees zeros on its left unless it is absolute frame 0
            new = feats[skip : skip + (b - a)]
            if new.shape[0] != b - a or not mask[skip : skip + (b - a)].all():
                raise RuntimeError(f"log-mel framing mismatch: wanted frames [{a}, {b}), got {new.shape[0]}")
            self._features = new if self._features is None else np.concatenate([self._features, new])
            self._frames = b
            keep_from = self.hop * max(0, b - 1)
            self._samples = self._samples[keep_from - self._sample0 :]
            self._sample0 = keep_from

    def _subsample(self, upto: int) -> None:
        """Subsample the tokens after the cached ones, up to ``upto``, into the embedding cache, in pieces of at most
        ``max_window_tokens``, each from one token before its first (the convolutions' left context:
        the window's own zero padding then only reaches that discarded token). Frames past the final
        ones are zeros and masked, as in the whole clip."""
        fpt = self.field.frames_per_token
        while self._token0 + self.buffered_tokens < upto:
            a = self._token0 + self.buffered_tokens
            b = min(upto, a + self.max_window_tokens)
            first = max(0, a - SUBSAMPLING_LEFT_TOKENS)
            assert self._features is not None  # upto > 0 implies at least one final frame
            frames = np.zeros((fpt * (b - first), self._features.shape[1]), np.float32)
            mask = np.zeros(fpt * (b - first), bool)
            lo, hi = fpt * first, min(fpt * b, self._frames)
            frames[: hi - lo] = self._features[lo - self._frame0 : hi - self._frame0]
            mask[: hi - lo] = True
            self.max_subsample_frames = max(self.max_subsample_frames, frames.shape[0])
            embeddings, embeddings_mask = self.subsample(frames, mask)
            embeddings, embeddings_mask = (
                embeddings[a - first : b - first],
                embeddings_mask[a - first : b - first],
            )
            if embeddings.shape[0] != b - a:
                raise RuntimeError(
                    f"subsampling returned {embeddings.shape[0] + a - first} tokens for {b - first}"
                )
            if self._embeddings is None or not self._embeddings.shape[0]:
                self._embeddings, self._embeddings_mask, self._token0 = embeddings, embeddings_mask, a
            else:
                self._embeddings = np.concatenate([self._embeddings, embeddings])
                self._embeddings_mask = np.concatenate([self._embeddings_mask, embeddings_mask])

    def _emit(self, upto: int, *, at_end: bool, tail_end: int | None = None) -> list[TokenBlock]:
        """Final tokens ``[emitted_tokens, upto)`` in windows of at most ``max_window_tokens``; with
        ``tail_end > upto``, the last window also runs the provisional tail ``[upto, tail_end)``."""
        blocks: list[TokenBlock] = []
        tail_end = upto if tail_end is None else tail_end
        audio_end_ms = round(self.total_samples * 1000 / self.sample_rate_hz)
        pending_tail = tail_end > upto
        while self.emitted_tokens < upto or pending_tail:
            s = self.field.window_start(self.emitted_tokens)
            e = min(upto, s + self.max_window_tokens)
            self._subsample(e)
            tail = tail_end - e if e == upto else 0
            if self._embeddings is None:  # a tail before the first final token
                embeddings, mask = np.zeros((0, 0), np.float32), np.zeros(0, bool)
            else:
                lo, hi = s - self._token0, e - self._token0
                embeddings, mask = self._embeddings[lo:hi], self._embeddings_mask[lo:hi]
            if tail > 0:
                tail_embeddings, tail_mask = self._subsample_tail(e, tail_end)
                if not embeddings.shape[0]:
                    embeddings = embeddings.reshape(0, tail_embeddings.shape[1]).astype(tail_embeddings.dtype)
                embeddings = np.concatenate([embeddings, tail_embeddings])
                mask = np.concatenate([mask, tail_mask])
            self.max_conformer_tokens = max(self.max_conformer_tokens, e - s + tail)
            out = self.conform(embeddings, mask)
            self._width = int(out.shape[-1])
            new = out[self.emitted_tokens - s : e - s]
            if new.shape[0] != e - self.emitted_tokens:
                raise RuntimeError(f"encoder returned {out.shape[0]} tokens for a {e - s}-token window")
            end_ms = e * self.ms_per_token
            if at_end and e == upto:
                end_ms = min(end_ms, audio_end_ms)
            if new.shape[0]:
                blocks.append(
                    TokenBlock(new, self.emitted_tokens, self.emitted_tokens * self.ms_per_token, end_ms)
                )
            self.emitted_tokens = e
            if tail > 0:
                start_ms = e * self.ms_per_token
                blocks.append(
                    TokenBlock(out[e - s :], e, start_ms, max(start_ms, audio_end_ms), provisional=True)
                )
                pending_tail = False
        if blocks and not blocks[-1].provisional and blocks[0].first_token <= (self._provisional_from or 0):
            self._provisional_from = None  # the tail sent before is replaced
        if blocks and blocks[-1].provisional:
            self._provisional_from = blocks[-1].first_token
        self._trim()
        return blocks

    def _subsample_tail(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of tokens ``[a, b)`` as the clip ending at the last final frame gives them
        (frames past it zero and masked); not cached, since more audio changes them."""
        fpt = self.field.frames_per_token
        assert self._features is not None
        first = max(0, a - SUBSAMPLING_LEFT_TOKENS)
        frames = np.zeros((fpt * (b - first), self._features.shape[1]), np.float32)
        mask = np.zeros(fpt * (b - first), bool)
        lo, hi = fpt * first, min(fpt * b, self._frames)
        frames[: hi - lo] = self._features[lo - self._frame0 : hi - self._frame0]
        mask[: hi - lo] = True
        embeddings, embeddings_mask = self.subsample(frames, mask)
        return embeddings[a - first : b - first], embeddings_mask[a - first : b - first]

    def _trim(self) -> None:
        """Drop embeddings and features no later window needs. ``finish(num_samples)`` may re-encode
        from ``rewind_tokens`` before the newest token: its conformer window's embeddings and its
        tokens' frames (one token of left context) are kept."""
        oldest = max(0, self.emitted_tokens - self.rewind_tokens)
        if self._embeddings is not None:
            drop = min(self.field.window_start(oldest), self.emitted_tokens) - self._token0
            if drop > 0:
                self._embeddings = self._embeddings[drop:]
                self._embeddings_mask = self._embeddings_mask[drop:]
                self._token0 += drop
        if self._features is not None:
            keep_from = min(
                self.field.frames_per_token * max(0, oldest - SUBSAMPLING_LEFT_TOKENS), self._frames
            )
            if keep_from > self._frame0:
                self._features = self._features[keep_from - self._frame0 :]
                self._frame0 = keep_from


def check_receptive_field(
    field: ReceptiveField, encode: EncodeFn, feature_size: int, *, rel_tol: float, seed: int = 0
) -> float:
    """Verify ``field`` against the real encoder on random features; returns the largest relative error.

    Encodes ``left_context + 3 chunks`` tokens whole, then from an aligned window start past the first
    token, and compares the tokens the policy would keep; then perturbs the first frame past token
    ``u``'s lookahead and checks token ``u`` is unchanged.

    Raises:
        ValueError: the encoder reaches further than ``field`` says (the bundle does not match this code).
    """
    rng = np.random.default_rng(seed)
    fpt = field.frames_per_token
    tokens = field.left_context_tokens + 3 * field.chunk_tokens + 2
    feats = rng.standard_normal((fpt * tokens, feature_size)).astype(np.float32)
    mask = np.ones(fpt * tokens, bool)
    whole = np.asarray(encode(feats, mask), np.float32)
    scale = float(np.abs(whole).max()) or 1.0
    first_new = tokens - field.chunk_tokens - 1
    s = field.window_start(first_new)
    window = np.asarray(encode(feats[fpt * s :], mask[fpt * s :]), np.float32)
    err = float(np.abs(window[first_new - s :] - whole[first_new:]).max()) / scale
    u = first_new
    bumped = feats.copy()
    bumped[fpt * u + field.lookahead_frames + 1] += 1.0
    err = max(err, float(np.abs(np.asarray(encode(bumped, mask), np.float32)[u] - whole[u]).max()) / scale)
    if err > rel_tol:
        raise ValueError(
            f"the audio encoder's receptive field is wider than {field} (relative error {err:.2e} > "
            f"{rel_tol:.0e}); incremental encoding would differ from whole-clip encoding"
        )
    return err


def check_subsampling_field(
    field: ReceptiveField, subsample: SubsampleFn, feature_size: int, *, rel_tol: float, seed: int = 1
) -> float:
    """Verify the subsampling's reach (``SUBSAMPLING_LEFT_TOKENS`` left, ``lookahead_frames`` right)
    against the real ``audio_subsample`` graph; returns the largest relative error.

    Subsamples ``2 * chunk + 3`` tokens whole and from one token before token ``u``, compares the
    embeddings from ``u`` on, then perturbs the frame just left of that window and the first frame
    past token ``u``'s lookahead and checks embedding ``u`` is unchanged.

    Raises:
        ValueError: the subsampling reaches further (the incremental encoder would differ).
    """
    rng = np.random.default_rng(seed)
    fpt = field.frames_per_token
    tokens = 2 * field.chunk_tokens + 3
    feats = rng.standard_normal((fpt * tokens, feature_size)).astype(np.float32)
    mask = np.ones(fpt * tokens, bool)
    whole = np.asarray(subsample(feats, mask)[0], np.float32)
    scale = float(np.abs(whole).max()) or 1.0
    u = field.chunk_tokens + 1
    first = u - SUBSAMPLING_LEFT_TOKENS
    window = np.asarray(subsample(feats[fpt * first :], mask[fpt * first :])[0], np.float32)
    err = float(np.abs(window[u - first :] - whole[u:]).max()) / scale
    for frame in (fpt * first - 1, fpt * u + field.lookahead_frames + 1):
        bumped = feats.copy()
        bumped[frame] += 1.0
        err = max(
            err, float(np.abs(np.asarray(subsample(bumped, mask)[0], np.float32)[u] - whole[u]).max()) / scale
        )
    if err > rel_tol:
        raise ValueError(
            f"the audio subsampling reaches further than {SUBSAMPLING_LEFT_TOKENS} token left and "
            f"{field.lookahead_frames} frames right (relative error {err:.2e} > {rel_tol:.0e}); "
            "incremental encoding would differ from whole-clip encoding"
        )
    return err
