"""One request's state inside the engine: its prompt embeddings, prefix-cache keys and snapshot
lengths, predicted output, output processor, sampler and grammar state, and its timings."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gemma_mesh.decoder.grammar import GrammarState
from gemma_mesh.decoder.output import Delta, OutputProcessor
from gemma_mesh.decoder.prefix_cache import snapshot_lengths, token_keys
from gemma_mesh.decoder.request import RequestHandle
from gemma_mesh.model.generation import embed_prompt
from gemma_mesh.model.sampling import Sampler, TokenLogprob, token_logprob


class ThoughtBudget:
    """Counts a request's thought-channel tokens (``channel_start`` .. ``channel_end``, the
    bundle's markers). Once ``budget`` tokens were thought, the open channel is closed (the engine
    writes ``channel_end`` instead of sampling) and no new one may open: the answer follows
    (vLLM's ``thinking_token_budget``)."""

    def __init__(self, budget: int, start_id: int, end_id: int) -> None:
        self.budget, self.start_id, self.end_id = budget, start_id, end_id
        self.thought = 0
        self.inside = False

    @property
    def spent(self) -> bool:
        return self.thought >= self.budget

    def forced(self) -> int | None:
        """The token to write instead of sampling (the channel's end), or None."""
        return self.end_id if self.inside and self.spent else None

    def accept(self, token: int) -> None:
        if not self.inside:
            self.inside = token == self.start_id
        elif token == self.end_id:
            self.inside = False
        else:
            self.thought += 1


class Sequence:
    """A request admitted to ``engine`` (the ``Engine``, untyped here so that this module does not
    import it); its rows, cursors and outputs are the engine's to update."""

    def __init__(self, handle: RequestHandle, engine: Any) -> None:
        req = handle.request
        bundle = engine.bundle
        self.handle = handle
        self.req = req
        self.embeds, self.per_layer = embed_prompt(bundle, req.input_ids, req.soft_tokens)
        # A prediction longer than what may be generated could never be accepted in full.
        prediction = np.zeros(0, np.int64) if req.prediction is None else req.prediction
        self.prediction = np.asarray(prediction, dtype=np.int64)[: max(req.max_tokens - 1, 0)]
        if self.prediction.size:  # prefilled right after the prompt, so embedded with it
            embeds, per_layer = bundle.embed(self.prediction[None])
            self.embeds = np.concatenate([self.embeds, embeds[0]])
            self.per_layer = np.concatenate([self.per_layer, per_layer[0]])
        # Inputs known to be right: the prompt, then each predicted token once the sampler picked it.
        self.confirmed = self.prompt_len
        media = []
        cursor: dict[int, int] = {}
        for placeholder, tokens in req.soft_tokens:
            positions = np.flatnonzero(req.input_ids == placeholder)
            start = cursor.get(placeholder, 0)
            media.append((positions[start : start + tokens.shape[0]], tokens))
            cursor[placeholder] = start + tokens.shape[0]
        self.keys = token_keys(req.input_ids, media)
        # Prompts diverge at turn starts (a new user message) and at media (a different image, or a
        # growing audio segment whose text follows its last token): snapshot there.
        boundaries = [int(p[0]) for p, _ in media if p.size] + [int(p[-1]) + 1 for p, _ in media if p.size]
        if engine.turn_start_id is not None:
            boundaries += np.flatnonzero(req.input_ids == engine.turn_start_id).tolist()
        self.snapshots = snapshot_lengths(len(req.input_ids), boundaries, engine.prefix_cache.block_tokens)
        self.processor = OutputProcessor(
            bundle.tokenizer,
            stop_token_ids=() if req.ignore_eos else bundle.manifest.stop_token_ids,
            channel_start_id=engine.channel_ids[0],
            channel_end_id=engine.channel_ids[1],
            stop_strings=req.stop,
            enable_thinking=req.enable_thinking,
            max_tokens=req.max_tokens,
            keep_token_ids=engine.tool_call_marker_ids if req.keep_tool_call_markers else (),
        )
        self.sampler = Sampler(req.sampling, prompt_ids=req.input_ids)
        self.grammar = (
            None
            if req.constraint is None
            else GrammarState(
                req.constraint,
                after_thought=req.enable_thinking,
                channel_start_id=engine.channel_ids[0],
                channel_end_id=engine.channel_ids[1],
                stop_token_ids=bundle.manifest.stop_token_ids,
            )
        )
        start, end = engine.channel_ids
        self.budget = (
            ThoughtBudget(req.thinking_token_budget, start, end)
            if req.thinking_token_budget is not None and start is not None and end is not None
            else None
        )
        self.logprobs: list[TokenLogprob] = []  # of tokens not yet in a delta
        self.held: Delta | None = None  # deltas held back by req.stream_interval_tokens
        self.cursor = 0
        self.cached = 0
        self.last_token = -1
        self.arrival = time.monotonic()
        self.admitted = 0.0
        self.first_token_at = 0.0
        self.last_token_at = 0.0

    @property
    def prompt_len(self) -> int:
        return int(self.req.input_ids.shape[0])

    @property
    def input_len(self) -> int:
        """Tokens to prefill: the prompt, then the prediction."""
        return self.prompt_len + int(self.prediction.shape[0])

    @property
    def accepted_prediction(self) -> int:
        return self.confirmed - self.prompt_len

    def sample(self, logits: np.ndarray) -> int:
        """The next token from ``logits [V]`` (masked already); records its log-probabilities
        when the request asked for them."""
        forced = self.budget.forced() if self.budget is not None else None
        if forced is not None:
            token = forced
        else:
            if self.budget is not None and self.budget.spent:  # no new thought once it is spent
                logits[self.budget.start_id] = -np.inf
            token = self.sampler(logits)
        if self.req.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.req.logprobs))
        return token

    def attach_logprobs(self, delta: Delta) -> Delta:
        """Move the log-probabilities of ``delta``'s tokens (the oldest recorded) onto it."""
        if self.logprobs:
            n = len(delta.token_ids)
            delta.logprobs, self.logprobs = self.logprobs[:n], self.logprobs[n:]
        return delta
