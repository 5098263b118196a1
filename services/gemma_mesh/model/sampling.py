"""Next-token selection from logits: greedy, temperature, top-k, top-p, seeded.

Pure numpy. The order of the filters matches transformers' ``generate()`` logits processors
(temperature, then top-k, then top-p), and greedy is ``argmax`` with the lowest id winning ties,
as ``torch.argmax`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemma_mesh.common.errors import InvalidRequest

# Temperatures below this are greedy (as in vLLM): dividing logits by ~0 overflows to inf.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens.

    Attributes:
        temperature: below ``SAMPLING_EPS`` (e.g. 0) means greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = no limit).
        top_p: keep the smallest set whose probability reaches top_p, in (0, 1].
        seed: seed of the request's own random generator (None = nondeterministic).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed}", param="seed")

    @property
    def greedy(self) -> bool:
        """True when temperature < ``SAMPLING_EPS`` (0 included)."""
        return self.temperature < SAMPLING_EPS


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a chosen token and of the ``top`` most likely tokens (id, logprob),
    most likely first (ties: lowest id first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """Log-softmax of ``logits [V]`` (float64; ``-inf`` entries, masked tokens, get ``-inf``) at
    ``token_id``, and the ``top`` best entries. OpenAI's ``logprobs``/``top_logprobs``; the
    values are those of the distribution the sampler was given, before temperature (vLLM's
    default ``raw_logprobs``, with grammar masks applied)."""
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top:
        ids = (
            np.argpartition(-logprobs, top - 1)[:top]
            if top < logprobs.shape[0]
            else np.arange(logprobs.shape[0])
        )
        ids = ids[np.lexsort((ids, -logprobs[ids]))]
        best = tuple((int(i), float(logprobs[i])) for i in ids)
    return TokenLogprob(int(token_id), float(logprobs[token_id]), best)


class Sampler:
    """Chooses the next token for one sequence; owns that sequence's random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token id from ``logits [V]`` (any float dtype)."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < scores.shape[-1]:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - np.max(scores))
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < p.top_p  # always keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self._rng.choice(probs.shape[-1], p=probs))
