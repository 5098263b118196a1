"""``audio.streaming``: incremental tokens equal whole-clip tokens; work per step stays bounded."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from gemma_mesh.audio.streaming import (
    IncrementalAudioEncoder,
    ReceptiveField,
    check_receptive_field,
    check_subsampling_field,
)
from gemma_mesh.model.audio_features import LogMelExtractor
from gemma_mesh.model.audio_io import decode_audio

RATE = 16_000
E4B_AUDIO_CONFIG = {  # transformers' Gemma4AudioConfig defaults (E4B)
    "num_hidden_layers": 12,
    "attention_chunk_size": 12,
    "attention_context_left": 13,
    "attention_context_right": 0,
    "conv_kernel_size": 5,
}


@pytest.fixture(scope="module")
def field(tiny_bundle) -> ReceptiveField:
    config = json.loads((tiny_bundle.path / "config.json").read_text())["audio_config"]
    return ReceptiveField.from_audio_config(config)


@pytest.fixture(scope="module")
def encode(tiny_bundle):
    return lambda features, mask: tiny_bundle.encode_audio_features([features], [mask])[0]


@pytest.fixture(scope="module")
def parts(tiny_bundle):
    """The two graphs the way AudioEngine calls them on one window: (subsample, conform)."""
    from gemma_mesh.audio.serving import AudioEngine
    from gemma_mesh.audio.settings import AudioSettings

    engine = AudioEngine(tiny_bundle, AudioSettings(verify_streaming=False))
    return engine.subsample_window, engine.conform_window


@pytest.fixture(scope="module")
def speech(librivox_clips) -> np.ndarray:
    return decode_audio(librivox_clips[0], RATE)  # 7.1 s of real speech


def _stream(field, log_mel, parts, wav, chunk, *, window=375):
    inc = IncrementalAudioEncoder(
        field, log_mel, *parts, ms_per_token=40, sample_rate_hz=RATE, max_window_tokens=window
    )
    blocks = []
    for i in range(0, len(wav), chunk):
        inc.insert(wav[i : i + chunk])
        blocks += inc.step()
    blocks += inc.finish()
    return inc, blocks


def _tokens(blocks):
    return np.concatenate([b.tokens for b in blocks]) if blocks else np.zeros((0, 0))


def test_receptive_field_from_config(field):
    assert field == ReceptiveField(left_context_tokens=31, chunk_tokens=12)  # tiny: 2 layers
    e4b = ReceptiveField.from_audio_config(E4B_AUDIO_CONFIG)
    assert e4b.left_context_tokens == 1 + 12 * (11 + 4)  # 181 tokens = 7.24 s
    assert e4b.window_start(500) == 312 and e4b.window_start(100) == 0
    with pytest.raises(ValueError, match="future"):
        ReceptiveField.from_audio_config({**E4B_AUDIO_CONFIG, "attention_context_right": 1})


def test_the_field_matches_the_exported_encoder(field, encode, parts):
    assert check_receptive_field(field, encode, 128, rel_tol=1e-4) < 1e-5
    narrower = ReceptiveField(left_context_tokens=field.left_context_tokens - 6, chunk_tokens=1)
    with pytest.raises(ValueError, match="receptive field"):
        check_receptive_field(narrower, encode, 128, rel_tol=1e-4)
    subsample = parts[0]
    assert check_subsampling_field(field, subsample, 128, rel_tol=1e-4) < 1e-5
    shorter = ReceptiveField(field.left_context_tokens, field.chunk_tokens, lookahead_frames=1)
    with pytest.raises(ValueError, match="subsampling reaches further"):
        check_subsampling_field(shorter, subsample, 128, rel_tol=1e-4)


def test_subsampling_check_catches_a_wider_left_context(field, parts):
    """A subsampling that also read the token before its left context (a fake: mixes in frame 4u - 5)."""
    subsample = parts[0]

    def wider(features, mask):
        embeddings, token_mask = subsample(features, mask)
        shifted = np.zeros_like(features)
        shifted[5:] = features[:-5]
        return embeddings + 0.5 * shifted[::4, : embeddings.shape[1]], token_mask

    with pytest.raises(ValueError, match="subsampling reaches further"):
        check_subsampling_field(field, wider, 128, rel_tol=1e-4)


@pytest.mark.parametrize("chunk_ms", [40, 100, 480, 1000])
def test_incremental_equals_whole_clip(tiny_bundle, field, parts, speech, chunk_ms):
    whole = tiny_bundle.encode_audio(speech)
    inc, blocks = _stream(field, tiny_bundle.log_mel, parts, speech, 16 * chunk_ms)
    tokens = _tokens(blocks)
    assert tokens.shape == whole.shape
    assert np.abs(tokens - whole).max() <= 1e-4
    # blocks tile the token axis and media time; the last one ends with the audio
    assert [b.first_token for b in blocks] == list(np.cumsum([0] + [len(b.tokens) for b in blocks[:-1]]))
    assert blocks[0].start_ms == 0 and blocks[-1].end_ms == round(len(speech) / 16)
    assert all(a.end_ms == b.start_ms for a, b in itertools.pairwise(blocks))
    # work per step: one bounded conformer window, never the utterance; subsampling only the new tokens
    new_tokens = -(-chunk_ms // 40) + 1
    assert inc.max_conformer_tokens <= field.left_context_tokens + field.chunk_tokens + new_tokens
    assert inc.max_subsample_frames <= 4 * (new_tokens + 1)


@pytest.mark.parametrize("num_samples", [100, 160, 161, 700, 1_283, 16_000 + 77, 30 * RATE])
def test_edge_lengths_match_the_whole_clip(tiny_bundle, field, parts, speech, num_samples):
    wav = np.resize(speech, num_samples).astype(np.float32)
    chunk = 16 * (333 if num_samples < RATE * 10 else 1500)
    tokens = _tokens(_stream(field, tiny_bundle.log_mel, parts, wav, chunk)[1])
    expected = tiny_bundle.log_mel.num_soft_tokens(num_samples)
    assert len(tokens) == expected
    if expected:  # the whole-clip path refuses clips too short for one token; a stream just emits none
        assert np.abs(tokens - tiny_bundle.encode_audio(wav)).max() <= 1e-4


def test_long_stream_is_consistent_and_bounded(tiny_bundle, field, parts, speech):
    """40 s (over the 30 s whole-clip limit): the first 30 s equal the whole-clip tokens of those 30 s,
    and another chunking with a smaller window gives the same tokens everywhere."""
    wav = np.resize(speech, 40 * RATE).astype(np.float32)
    inc, blocks = _stream(field, tiny_bundle.log_mel, parts, wav, 16 * 1000)
    tokens = _tokens(blocks)
    assert len(tokens) == 40 * 25
    first = tiny_bundle.encode_audio(wav[: 30 * RATE])
    assert np.abs(tokens[:749] - first[:749]).max() <= 1e-4  # token 749 reads frames past 30 s
    _, other = _stream(field, tiny_bundle.log_mel, parts, wav, 16 * 2000, window=64)
    assert np.abs(_tokens(other) - tokens).max() <= 1e-4
    assert inc.buffered_tokens <= field.left_context_tokens + field.chunk_tokens + 26
    assert inc.buffered_frames <= 4 * 27
    assert inc.buffered_samples <= 16_000 + 320


def test_work_per_step_does_not_grow_with_the_stream(tiny_bundle, field):
    """Ten minutes in 100 ms chunks with recording fake graphs: neither window ever grows."""
    calls, subsampled = [], []

    def fake_subsample(features, mask):
        subsampled.append(features.shape[0])
        return features.reshape(-1, 4, features.shape[1]).mean(axis=1), mask[::4]

    def fake_conform(embeddings, mask):
        calls.append(embeddings.shape[0])
        return embeddings

    log_mel = LogMelExtractor()
    inc = IncrementalAudioEncoder(
        field,
        log_mel,
        fake_subsample,
        fake_conform,
        ms_per_token=40,
        sample_rate_hz=RATE,
        max_window_tokens=375,
    )
    chunk = np.random.default_rng(0).standard_normal(1_600).astype(np.float32) * 0.1
    peak_samples = peak_frames = 0
    for _ in range(6_000):
        inc.insert(chunk)
        inc.step()
        peak_samples = max(peak_samples, inc.buffered_samples)
        peak_frames = max(peak_frames, inc.buffered_frames)
    inc.finish()
    assert inc.emitted_tokens == 600 * 25
    bound = field.left_context_tokens + field.chunk_tokens + 4
    assert max(calls) <= bound and inc.buffered_tokens <= bound and peak_samples <= 1_600 + 320
    assert max(subsampled) <= 4 * 5 and peak_frames <= 4 * 5  # a 100 ms chunk is 2.5 tokens
    assert max(calls[100:]) == max(calls[-100:])  # steady state from early on


def test_reset_starts_a_new_stream(tiny_bundle, field, parts, speech):
    inc, _ = _stream(field, tiny_bundle.log_mel, parts, speech[:8_000], 1_600)
    inc.reset()
    inc.insert(speech[:16_000])
    tokens = _tokens(inc.step() + inc.finish())
    assert np.abs(tokens - tiny_bundle.encode_audio(speech[:16_000])).max() <= 1e-4


def test_window_must_exceed_the_left_context(tiny_bundle, field, parts):
    with pytest.raises(ValueError, match="max_window_tokens"):
        IncrementalAudioEncoder(
            field, tiny_bundle.log_mel, *parts, ms_per_token=40, sample_rate_hz=RATE, max_window_tokens=40
        )


def _assemble(blocks) -> np.ndarray:
    """Tokens from blocks that may start again before the end of the ones before them (a rewind)."""
    tokens: list[np.ndarray] = []
    for block in blocks:
        kept = np.concatenate(tokens)[: block.first_token] if tokens else np.zeros((0, block.tokens.shape[1]))
        tokens = [kept, block.tokens]
    return np.concatenate(tokens)


@pytest.mark.parametrize("with_tail", [False, True])
@pytest.mark.parametrize("overshoot_ms", [0, 37, 200, 640, 1000])
def test_finish_at_an_earlier_sample_equals_the_shorter_whole_clip(
    tiny_bundle, field, parts, speech, overshoot_ms, with_tail
):
    """A segment that ends 3.2 s in, streamed ``overshoot_ms`` further in 100 ms chunks (a partial
    fed the encoder past the end): finishing at the end re-encodes the tail like the shorter clip."""
    end = 51_213  # 3.2 s, not on a frame or token boundary
    wav = speech[: end + overshoot_ms * 16]
    inc = IncrementalAudioEncoder(
        field, tiny_bundle.log_mel, *parts, ms_per_token=40, sample_rate_hz=RATE, max_window_tokens=375,
        rewind_tokens=30,
    )  # fmt: skip
    blocks = []
    for i in range(0, len(wav), 1600):
        inc.insert(wav[i : i + 1600])
        blocks += inc.step(tail=with_tail)
    emitted = inc.emitted_tokens
    tail = inc.finish(end)
    assert not any(b.provisional for b in tail)
    assert any(b.provisional for b in blocks) == with_tail
    if blocks[-1].provisional:  # the tail sent last is replaced (by an empty block if nothing else)
        assert tail and tail[0].first_token <= blocks[-1].first_token
    tokens = _assemble(blocks + tail)
    whole = tiny_bundle.encode_audio(speech[:end])
    assert tokens.shape == whole.shape
    assert np.abs(tokens - whole).max() <= 1e-4
    if emitted > inc.final_tokens(inc.final_frames(end)):
        assert tail[0].first_token < emitted  # tokens that had read past the end were sent again
    if tail:
        assert tail[-1].end_ms == round(end / 16)


def test_finish_refuses_an_end_beyond_the_rewind_or_the_audio(tiny_bundle, field, parts, speech):
    inc = IncrementalAudioEncoder(
        field, tiny_bundle.log_mel, *parts, ms_per_token=40, sample_rate_hz=RATE, max_window_tokens=375,
        rewind_tokens=10,
    )  # fmt: skip
    inc.insert(speech[: 5 * RATE])
    inc.step()
    with pytest.raises(ValueError, match="samples were inserted"):
        inc.finish(5 * RATE + 1)
    with pytest.raises(ValueError, match="more than the 10 kept"):
        inc.finish(3 * RATE)  # 2 s = 50 tokens back


@pytest.mark.parametrize("chunk_ms", [100, 500])
def test_a_provisional_tail_makes_every_step_the_whole_clip_so_far(
    tiny_bundle, field, parts, speech, chunk_ms
):
    """``step(tail=True)``: the final tokens plus the provisional tail equal the whole-clip encoding of
    the samples inserted so far, at every step; the final tokens are those of ``step()``."""
    inc = IncrementalAudioEncoder(
        field, tiny_bundle.log_mel, *parts, ms_per_token=40, sample_rate_hz=RATE, max_window_tokens=375
    )
    final: list[np.ndarray] = []
    chunk = 16 * chunk_ms
    for i in range(0, 4 * RATE, chunk):
        inc.insert(speech[i : i + chunk])
        blocks = inc.step(tail=True)
        assert all(not b.provisional for b in blocks[:-1]) and blocks[-1].provisional
        tail = blocks[-1]
        final += [b.tokens for b in blocks[:-1]]
        assert tail.first_token == inc.emitted_tokens == sum(len(t) for t in final)
        assert tail.end_ms == round((i + chunk) / 16)
        so_far = np.concatenate([*final, tail.tokens])
        whole = tiny_bundle.encode_audio(speech[: i + chunk])
        assert so_far.shape == whole.shape and np.abs(so_far - whole).max() <= 1e-4
        assert 1 <= len(tail.tokens) <= 2  # the lookahead: one or two tokens are not final yet
    # the final tokens are those of a stream without tails; finishing replaces the last tail
    plain = _tokens(_stream(field, tiny_bundle.log_mel, parts, speech[: 4 * RATE], chunk)[1])
    rest = inc.finish()
    assert rest[0].first_token == inc.emitted_tokens - len(rest[0].tokens) - sum(
        len(b.tokens) for b in rest[1:]
    )
    assert np.abs(np.concatenate([*final, *(b.tokens for b in rest)]) - plain).max() <= 1e-4


def test_a_tail_before_the_first_final_token(tiny_bundle, field, parts, speech):
    inc = IncrementalAudioEncoder(
        field, tiny_bundle.log_mel, *parts, ms_per_token=40, sample_rate_hz=RATE, max_window_tokens=375
    )
    inc.insert(speech[:500])  # 31 ms: three frames, so one token, not final yet
    (tail,) = inc.step(tail=True)
    assert tail.provisional and tail.first_token == 0 and inc.emitted_tokens == 0
    assert np.abs(tail.tokens - tiny_bundle.encode_audio(speech[:500])).max() <= 1e-4
    inc.insert(speech[500:1440])  # 90 ms: 8 frames, so both tokens are final and the tail is empty
    *final, empty = inc.step(tail=True)
    assert empty.provisional and empty.tokens.shape == (0, tail.tokens.shape[1])
    assert (empty.first_token, empty.end_ms) == (2, 90) and final[0].first_token == 0
    assert (
        np.abs(np.concatenate([b.tokens for b in final]) - tiny_bundle.encode_audio(speech[:1440])).max()
        <= 1e-4
    )
