"""Next-token selection from logits: logit bias, penalties, greedy, temperature, min-p, top-k, top-p, seeded.

Pure numpy. The order is vLLM's sampler's: ``logit_bias``, then the penalties (``repetition_penalty``
over prompt and output tokens as transformers' ``RepetitionPenaltyLogitsProcessor``;
``frequency_penalty`` and ``presence_penalty`` over output tokens as OpenAI defines them), then
greedy ``argmax`` (the lowest id winning ties, as ``torch.argmax``) or temperature, ``min_p``
(transformers' ``MinPLogitsWarper``), top-k and top-p (transformers' warpers, in that order).
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (np.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}", param=name)
        if not (np.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0):
            raise InvalidRequest(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        for token, bias in self.logit_bias:
            if not (np.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise InvalidRequest(
                    f"logit_bias of token {token} must be in [-100, 100], got {bias}", param="logit_bias"
                )
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

    @property
    def processes(self) -> bool:
        """True when a logit bias or a penalty changes the logits."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


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


def min_p_filter(scores: np.ndarray, min_p: float) -> np.ndarray:
    """``scores [V]`` (after temperature) with the tokens less likely than ``min_p`` times the most
    likely one set to ``-inf`` (transformers' ``MinPLogitsWarper``; the most likely always stays)."""
    probs = np.exp(scores - np.max(scores))
    return np.where(probs < min_p * probs.max(), -np.inf, scores)


class Sampler:
    """Chooses the next token for one sequence; owns that sequence's random generator and counts
    the tokens it chose (the output the penalties see). ``prompt_ids``: the prompt, which
    ``repetition_penalty`` also penalizes."""

    def __init__(self, params: SamplingParams, prompt_ids: np.ndarray | None = None) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._prompt = np.unique(np.asarray(prompt_ids if prompt_ids is not None else [], dtype=np.int64))
        self._counts: dict[int, int] = {}

    def process(self, logits: np.ndarray) -> np.ndarray:
        """``logits [V]`` after the logit bias and the penalties (float64; the input is unchanged)."""
        p = self.params
        scores = logits.astype(np.float64)
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias, strict=True)
            scores[list(ids)] += bias
        if p.repetition_penalty != 1.0:
            seen = np.union1d(
                self._prompt, np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            )
            picked = scores[seen]
            scores[seen] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if self._counts and (p.frequency_penalty or p.presence_penalty):
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float64, count=len(self._counts))
            scores[ids] -= p.frequency_penalty * counts + p.presence_penalty
        return scores

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token id from ``logits [V]`` (any float dtype) and count it."""
        token = self._choose(self.process(logits) if self.params.processes else logits)
        self._counts[token] = self._counts.get(token, 0) + 1
        return token

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / p.temperature
        if p.min_p > 0.0:
            scores = min_p_filter(scores, p.min_p)
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
