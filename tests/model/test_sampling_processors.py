"""The sampler's logit processors against the implementations they mirror.

``repetition_penalty``, ``logit_bias`` (as a one-token sequence bias) and ``min_p`` against
transformers' ``RepetitionPenaltyLogitsProcessor``, ``SequenceBiasLogitsProcessor`` and
``MinPLogitsWarper`` on the same logits; ``presence_penalty`` / ``frequency_penalty`` against
vLLM's ``apply_penalties`` (``vllm/model_executor/layers/utils.py``: ``logits -= frequency *
output_counts + presence * (output_counts > 0)``), written out here since vLLM is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.sampling import Sampler, SamplingParams, min_p_filter

V = 64
PROMPT = np.array([3, 5, 5, 9], dtype=np.int64)


def _logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, V).astype(np.float32)


def _sampler_after(params: SamplingParams, outputs: list[int]) -> Sampler:
    """A sampler whose sequence has generated ``outputs`` (each forced by a huge bias on its logits)."""
    sampler = Sampler(params, prompt_ids=PROMPT)
    for token in outputs:
        forced = np.full(V, -1e9, np.float32)
        forced[token] = 1e9
        assert sampler(forced) == token
    return sampler


OUTPUTS = [7, 9, 7, 12, 7]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    sampler = _sampler_after(SamplingParams(repetition_penalty=penalty), OUTPUTS)
    logits = _logits(1)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.as_tensor([[*PROMPT, *OUTPUTS]]), torch.as_tensor(logits[None], dtype=torch.float64)
    )[0].numpy()
    np.testing.assert_allclose(sampler.process(logits), expected, rtol=1e-12)
    assert not np.allclose(expected, logits)


def test_logit_bias_equals_transformers_sequence_bias() -> None:
    bias = {4: 5.5, 17: -100.0, 40: 0.25}
    sampler = Sampler(SamplingParams(logit_bias=tuple(bias.items())))
    logits = _logits(2)
    processor = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias.items()])
    expected = processor(torch.as_tensor([[1, 2]]), torch.as_tensor(logits[None], dtype=torch.float64))[0]
    np.testing.assert_allclose(sampler.process(logits), expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize(("presence", "frequency"), [(0.7, 0.0), (0.0, 1.1), (-0.5, 0.9), (2.0, -2.0)])
def test_presence_and_frequency_penalties_equal_vllm(presence: float, frequency: float) -> None:
    sampler = _sampler_after(SamplingParams(presence_penalty=presence, frequency_penalty=frequency), OUTPUTS)
    logits = _logits(3)
    counts = np.bincount(OUTPUTS, minlength=V).astype(np.float64)  # output tokens only, not the prompt
    expected = logits.astype(np.float64) - frequency * counts - presence * (counts > 0)
    np.testing.assert_allclose(sampler.process(logits), expected, rtol=1e-12)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_equals_transformers(min_p: float) -> None:
    scores = _logits(4).astype(np.float64) / 0.7
    expected = MinPLogitsWarper(min_p)(torch.as_tensor([[0]]), torch.as_tensor(scores[None]))[0].numpy()
    np.testing.assert_array_equal(min_p_filter(scores, min_p), expected)
    assert np.isinf(expected).any() and np.isfinite(expected).any()


def test_greedy_sees_the_processed_logits_and_the_raw_ones_are_untouched() -> None:
    logits = _logits(5)
    top = int(np.argmax(logits))
    sampler = Sampler(SamplingParams(logit_bias=((top, -100.0),)))
    before = logits.copy()
    assert sampler(logits) != top
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": ((3, 101.0),)}, "logit_bias"),
    ],
)
def test_out_of_range_settings_are_refused(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
