"""Sampling (greedy, temperature, top-k, top-p, seeds) and UTF-8-safe streaming detokenization."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer
from gemma_mesh.model.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([0.5, 2.0, 2.0, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    logits = _logits()

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_one_and_tiny_top_p_reduce_to_greedy():
    logits = _logits(3)
    best = int(np.argmax(logits))
    assert {Sampler(SamplingParams(temperature=2.0, top_k=1, seed=s))(logits) for s in range(10)} == {best}
    assert {Sampler(SamplingParams(temperature=2.0, top_p=1e-6, seed=s))(logits) for s in range(10)} == {best}


def test_top_k_never_draws_outside_the_k_best():
    logits = _logits(5)
    allowed = set(np.argsort(-logits)[:4].tolist())
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=4, seed=0))
    drawn = {sampler(logits) for _ in range(300)}
    assert drawn <= allowed and len(drawn) > 1


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}],
)
def test_invalid_sampling_params_are_refused(kwargs):
    with pytest.raises(InvalidRequest):
        SamplingParams(**kwargs)


def test_detokenizer_never_emits_half_a_character(tiny_bundle):
    tok = tiny_bundle.tokenizer
    text = "Grüße aus Köln — 日本語のテキスト, emoji 🎙️ and plain words."
    ids = tok.encode(text, add_special_tokens=False).ids
    # The tiny vocabulary has no merges for these characters: they arrive as byte-fallback tokens.
    assert len(ids) > len(text) // 2
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 5  # partial characters were held back


def test_detokenizer_skips_control_tokens(tiny_bundle):
    tok = tiny_bundle.tokenizer
    turn_end = tiny_bundle.manifest.token_id("turn_end")
    ids = [*tok.encode("Hello", add_special_tokens=False).ids, turn_end]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "Hello"
