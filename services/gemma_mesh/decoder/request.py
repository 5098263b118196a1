"""A request to the decoder engine and the caller's side of it: ``GenerationRequest``, the stream of
``Delta`` events ending in one ``Finished``, and ``RequestHandle`` (thread-safe, sync or async)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gemma_mesh.common.errors import MeshError
from gemma_mesh.decoder.grammar import CompiledGrammar
from gemma_mesh.decoder.output import Delta, FinishReason
from gemma_mesh.model.sampling import SamplingParams


class EngineLink(Protocol):
    """What a ``RequestHandle`` needs of the engine that runs it (the engine implements it)."""

    def wake(self) -> None:
        """Wake the engine thread (a cancel frees the row within one step)."""

    def _post(
        self,
        loop: asyncio.AbstractEventLoop,
        target: asyncio.Queue,
        event: object,
        cancelled: threading.Event,
    ) -> None:
        """Queue ``event`` for ``target`` on ``loop``, delivered at the end of the engine step."""


@dataclass
class GenerationRequest:
    """One prompt to complete. ``soft_tokens`` are ``(placeholder_id, [n, H])`` in prompt order.

    ``prediction`` (int64 ``[m]``, optional): the tokens the answer is expected to be (OpenAI's
    predicted outputs). The engine verifies them in the prefill run and keeps those the sampler
    picks; the output does not depend on it. At most ``max_tokens - 1`` of them are used.

    ``stream_interval_tokens``: deltas are held until they carry this many token ids (or the request
    finishes): fewer, larger events for callers that need the text rather than each token as it
    comes (vLLM's ``--stream-interval``). 1 = one delta per step.

    ``constraint``: a grammar compiled by the engine's ``GrammarCompiler``; each step masks the
    tokens it does not allow before the request's sampler sees the logits.
    """

    request_id: str
    input_ids: np.ndarray
    soft_tokens: Sequence[tuple[int, np.ndarray]] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 64
    stop: Sequence[str] = ()
    enable_thinking: bool = False
    prefix_cache_key: str = ""
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    priority: int = 0  # admitted lowest first, then in arrival order (vLLM's priority policy)
    prediction: np.ndarray | None = None  # int64 [m]: the tokens the caller expects (predicted outputs)
    stream_interval_tokens: int = 1
    # Structured output: the answer matches this compiled constraint (after the thought channel).
    constraint: CompiledGrammar | None = None
    # Tool-call markers stay in the answer text (the servicer parses the calls out of it).
    keep_tool_call_markers: bool = False
    # Log-probabilities: None = none; N = the chosen token's and the N most likely (0-20).
    logprobs: int | None = None
    # Thought-channel tokens allowed before the engine closes the channel (None = no limit).
    thinking_token_budget: int | None = None


@dataclass
class Finished:
    """The last event of a request."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    queue_s: float
    total_s: float
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class RequestHandle:
    """The caller's side of a request: ``events()`` (async) or ``iter_events()`` (sync), and ``cancel()``."""

    def __init__(self, engine: EngineLink, request: GenerationRequest) -> None:
        self.request = request
        self._engine = engine
        self._cancelled = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aqueue: asyncio.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
        self._squeue: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating; the row is freed within one step."""
        self._cancelled.set()
        self._engine.wake()

    def emit(self, event: Delta | Finished | MeshError) -> None:
        """Queue ``event`` for the caller (engine thread only). Async callers get it at the end of the
        engine step (``Engine._flush_events``): one event-loop wake-up per step for all its requests."""
        if self._loop is not None:
            self._engine._post(self._loop, self._aqueue, event, self._cancelled)
        else:
            self._squeue.put(event)

    async def events(self) -> AsyncIterator[Delta | Finished]:
        """Deltas, then one ``Finished``. Raises the request's ``MeshError`` if it failed.

        Deltas already queued when the consumer asks are merged (same channel, in order), so a
        consumer that fell behind (a busy event loop, a slow client) gets fewer, larger messages
        instead of one per token; the text and token ids are unchanged.
        """
        pending = None
        while True:
            event = pending if pending is not None else await self._aqueue.get()
            pending = None
            if isinstance(event, MeshError):
                raise event
            if isinstance(event, Delta):
                while not self._aqueue.empty():
                    following = self._aqueue.get_nowait()
                    if not isinstance(following, Delta) or following.channel != event.channel:
                        pending = following
                        break
                    event = Delta(
                        event.channel,
                        event.text + following.text,
                        [*event.token_ids, *following.token_ids],
                        [*event.logprobs, *following.logprobs],
                    )
            yield event
            if isinstance(event, Finished):
                return

    def iter_events(self, timeout_s: float | None = None) -> Iterator[Delta | Finished]:
        """Synchronous ``events()`` for callers without an event loop."""
        while True:
            event = self._squeue.get(timeout=timeout_s)
            if isinstance(event, MeshError):
                raise event
            yield event
            if isinstance(event, Finished):
                return


def deliver(items: list[tuple[asyncio.Queue, object, threading.Event]]) -> None:
    """Runs on the callers' event loop: one step's events, in order."""
    for target, event, _ in items:
        target.put_nowait(event)
