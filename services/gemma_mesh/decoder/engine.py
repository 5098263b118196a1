"""The decoder engine: continuous batching over one ONNX decoder session, with chunked prefill and prefix caching.

One scheduler thread owns the session and the batch KV cache. Each iteration it:

1. drops cancelled requests (their rows are freed at once: the last row moves into the hole);
2. admits waiting requests while rows are free, lowest ``priority`` first, then oldest (vLLM's
   priority policy; restoring each one's longest cached prompt prefix);
3. prefills the admitted prompts together in one run of ``[k, S]`` tokens, ``k * S`` at most
   ``prefill_chunk_tokens`` (a long prompt goes in chunks and cannot stall decoding for more than
   one; many short prompts, such as live captions arriving at once, share one run instead of one
   run each); rows with shorter chunks are padded at the end, and padding is never stored or seen;
4. runs one decode step for every decoding sequence together (requests join and leave at step
   boundaries), samples each row with its own sampler and streams the text.

Rows ``0 .. n_decoding-1`` decode; rows ``n_decoding ..`` are being prefilled. Each sequence sees
only its own keys (the masks come from its own length and ring), so batched greedy output equals
the solo run's. Requests talk to the engine through ``RequestHandle`` (thread-safe event queue).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gemma_mesh.common.errors import InvalidRequest, MeshError, Overloaded
from gemma_mesh.common.logging import get_logger
from gemma_mesh.decoder.kv_cache import BatchKVCache, scratch_buffer
from gemma_mesh.decoder.metrics import DecoderMetrics
from gemma_mesh.decoder.output import Channel, Delta, FinishReason, OutputProcessor
from gemma_mesh.decoder.prefix_cache import PrefixCache, snapshot_lengths, token_keys
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.model.generation import embed_prompt
from gemma_mesh.model.sampling import Sampler, SamplingParams

log = get_logger("decoder.engine")


@dataclass
class GenerationRequest:
    """One prompt to complete. ``soft_tokens`` are ``(placeholder_id, [n, H])`` in prompt order."""

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


class RequestHandle:
    """The caller's side of a request: ``events()`` (async) or ``iter_events()`` (sync), and ``cancel()``."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
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
                        event.channel, event.text + following.text, [*event.token_ids, *following.token_ids]
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


# ORT device names of the execution providers that keep tensors in their own memory.
_PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda"}


def make_kv_cache(session: Any, manifest: Any, settings: DecoderSettings, dtype: np.dtype) -> BatchKVCache:
    """The engine's KV cache: on the session's device (``DeviceKVCache``) when ``kv_storage`` is
    ``device``, or ``auto`` and the decoder runs on a GPU provider; numpy arrays otherwise."""
    provider = session.get_providers()[0]
    device = _PROVIDER_DEVICES.get(provider, "cpu")
    storage = settings.kv_storage
    if storage == "auto":
        storage = "device" if device != "cpu" else "host"
    args = (manifest.text, settings.max_batch_size, dtype, settings.kv_initial_tokens)
    if storage == "host":
        return BatchKVCache(*args)
    from gemma_mesh.decoder.device_kv import DeviceKVCache

    log.info("KV cache on the device", device=device, provider=provider)
    return DeviceKVCache(*args, device=device, device_id=0, providers=session.get_providers())


def _deliver(items: list[tuple[asyncio.Queue, object, threading.Event]]) -> None:
    """Runs on the callers' event loop: one step's events, in order."""
    for target, event, _ in items:
        target.put_nowait(event)


class _Sequence:
    def __init__(self, handle: RequestHandle, engine: Engine) -> None:
        req = handle.request
        bundle = engine.bundle
        self.handle = handle
        self.req = req
        self.embeds, self.per_layer = embed_prompt(bundle, req.input_ids, req.soft_tokens)
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
        )
        self.sampler = Sampler(req.sampling)
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


class Engine:
    """Continuous-batching generation over ``bundle``'s decoder. Thread-safe ``submit``; call ``start()`` first."""

    def __init__(
        self, bundle: ModelBundle, settings: DecoderSettings, metrics: DecoderMetrics | None = None
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.metrics = metrics or DecoderMetrics()
        manifest = bundle.manifest
        self.session = bundle.session("decoder_model_merged")
        self._scratch: dict[str, np.ndarray] = {}  # I/O-binding output buffers, by output name
        self.kv = make_kv_cache(self.session, manifest, settings, bundle.float_dtype)
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes, settings.prefix_block_tokens)
        tokens = manifest.special_tokens
        self.channel_ids = (
            tokens["channel_start"].id if "channel_start" in tokens else None,
            tokens["channel_end"].id if "channel_end" in tokens else None,
        )
        self.turn_start_id = tokens["turn_start"].id if "turn_start" in tokens else None
        self.max_context = settings.max_context_tokens or manifest.text.max_position_embeddings
        # A heap of (priority, arrival number, handle): admission order.
        self._waiting: list[tuple[int, int, RequestHandle]] = []
        self._arrivals = itertools.count()
        self._decoding: list[_Sequence] = []
        self._prefilling: list[_Sequence] = []  # rows len(_decoding) .. in order
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="decoder-engine", daemon=True)
        # Events of this step for async callers, by event loop: delivered with one
        # call_soon_threadsafe per loop per step instead of one per token (fewer wake-ups and GIL
        # hand-overs between the engine thread and the gRPC event loop).
        self._outbox: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object, threading.Event]]
        ] = {}
        self.steps = 0

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``.

        Raises:
            InvalidRequest: empty prompt, ``max_tokens <= 0``, prompt + max_tokens over the context.
            Overloaded: the waiting queue is full (``max_queue_size``).
        """
        n = int(request.input_ids.shape[0])
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="messages")
        if request.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {request.max_tokens}", param="max_tokens")
        if n + request.max_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the context length of "
                f"{self.max_context} tokens",
                # The prompt alone over the context: the messages are at fault, not max_tokens.
                param="messages" if n >= self.max_context else "max_tokens",
            )
        handle = RequestHandle(self, request)
        with self._cond:
            active = len(self._decoding) + len(self._prefilling)
            if active + len(self._waiting) >= self.settings.max_batch_size + self.settings.max_queue_size:
                raise Overloaded(
                    f"the decoder is full: {self.settings.max_batch_size} sequences running and "
                    f"{self.settings.max_queue_size} waiting (max_batch_size, max_queue_size)"
                )
            heapq.heappush(self._waiting, (request.priority, next(self._arrivals), handle))
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()
        return handle

    # ---------------------------------------------------------- event delivery
    def _post(
        self,
        loop: asyncio.AbstractEventLoop,
        target: asyncio.Queue,
        event: object,
        cancelled: threading.Event,
    ) -> None:
        self._outbox.setdefault(loop, []).append((target, event, cancelled))

    def _flush_events(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the callers' loop is closed: nobody listens any more
                for _, _, cancelled in items:
                    cancelled.set()

    # ------------------------------------------------------------- the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (self._waiting or self._decoding or self._prefilling):
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self._prefilling:
                    self._prefill_batch()
                if self._decoding:
                    self._decode_step()
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(MeshError(f"decoder step failed: {type(exc).__name__}: {exc}"))
            self._flush_events()
        self._fail_all(MeshError("the decoder is shutting down"))
        self._flush_events()

    def _fail_all(self, error: MeshError) -> None:
        for seq in [*self._decoding, *self._prefilling]:
            seq.handle.emit(error)
        self._decoding, self._prefilling = [], []
        with self._cond:
            waiting, self._waiting = self._waiting, []
            self.metrics.queue_depth.set(0)
        for _, _, handle in waiting:
            handle.emit(error)
        for row in range(self.settings.max_batch_size):
            self.kv.reset_row(row)

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self._decoding))):
            if self._decoding[row].handle.cancelled:
                self._remove_row(row)
                self.metrics.requests.labels("cancelled").inc()
        for j in reversed(range(len(self._prefilling))):
            if self._prefilling[j].handle.cancelled:
                self._remove_prefilling(j)
                self.metrics.requests.labels("cancelled").inc()
        with self._cond:
            cancelled = sum(entry[2].cancelled for entry in self._waiting)
            if cancelled:
                self._waiting = [entry for entry in self._waiting if not entry[2].cancelled]
                heapq.heapify(self._waiting)
                self.metrics.queue_depth.set(len(self._waiting))
                self.metrics.requests.labels("cancelled").inc(cancelled)
        self.metrics.active.set(len(self._decoding) + len(self._prefilling))

    def _remove_row(self, row: int) -> None:
        """Retire decoding row ``row``: the last decoding row fills the hole, the last prefilling row
        fills the last decoding row's old place (two row copies, whatever the batch)."""
        last = len(self._decoding) - 1
        self.kv.move_row(last, row)
        self._decoding[row] = self._decoding[last]
        self._decoding.pop()
        self.kv.reset_row(last)
        if self._prefilling:  # the prefilling rows start right after the decoding rows again
            end = last + len(self._prefilling)
            self.kv.move_row(end, last)
            self.kv.reset_row(end)
            self._prefilling.insert(0, self._prefilling.pop())

    def _remove_prefilling(self, j: int) -> None:
        base = len(self._decoding)
        end = base + len(self._prefilling) - 1
        self.kv.move_row(end, base + j)
        self.kv.reset_row(end)
        self._prefilling[j] = self._prefilling[-1]
        self._prefilling.pop()

    def _admit(self) -> None:
        """Admit waiting requests while rows are free (at most ``prefill_chunk_tokens`` prefilling)."""
        while (
            len(self._decoding) + len(self._prefilling) < self.settings.max_batch_size
            and len(self._prefilling) < self.settings.prefill_chunk_tokens
        ):
            with self._cond:
                if not self._waiting:
                    return
                _, _, handle = heapq.heappop(self._waiting)
                self.metrics.queue_depth.set(len(self._waiting))
            try:
                seq = _Sequence(handle, self)
            except MeshError as exc:
                handle.emit(exc)
                continue
            seq.admitted = time.monotonic()
            row = len(self._decoding) + len(self._prefilling)
            self.kv.reset_row(row)
            snap = self.prefix_cache.lookup(seq.req.prefix_cache_key, seq.keys)
            if snap is not None:
                self.kv.restore(row, snap)
                seq.cursor = seq.cached = snap.length
                self.metrics.cached_prompt_tokens.inc(snap.length)
            self.metrics.prefix_hit_ratio.set(self.prefix_cache.stats.hit_ratio)
            self._prefilling.append(seq)

    def _run_step(
        self,
        rows: slice,
        embeds: np.ndarray,
        per_layer: np.ndarray,
        positions: np.ndarray,
        valid: np.ndarray | None = None,
    ) -> np.ndarray:
        """One decoder run over ``rows``; returns the logits of each row's last real step token ``[n, V]``.

        ``valid [n]``: real tokens per row (the rest is end padding); default all ``S``.
        """
        lengths = self.kv.lengths[rows]
        n, seq = positions.shape
        self.kv.reserve(int(lengths.max()) + seq)
        full, sliding = self.kv.masks(rows, positions)
        feeds = {
            "inputs_embeds": embeds,
            "per_layer_inputs": per_layer,
            "attention_mask": full,
            "sliding_attention_mask": sliding,
            "position_ids": positions,
            # Only the last real token's logits are sampled: a prefill skips the LM head elsewhere.
            "logits_indices": (
                np.full((n, 1), seq - 1, dtype=np.int64)
                if valid is None
                else np.maximum(valid - 1, 0).astype(np.int64)[:, None]
            ),
        }
        presents, logits = self._run_bound(feeds, rows, seq)
        self.kv.commit(rows, positions, presents, valid)
        self.steps += 1
        return logits[:, 0]

    def _run_bound(self, feeds: dict[str, np.ndarray], rows: slice, seq: int) -> tuple[dict, np.ndarray]:
        """Run the decoder with I/O binding: host inputs are bound zero-copy from numpy, the KV cache
        binds its own buffers (host arrays, or OrtValues on the device), logits go into a reusable
        host buffer. Returns ``(presents, logits [n, 1, V])``."""
        n = rows.stop - rows.start
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.kv.bind_past(binding, rows)
        bound = self.kv.bind_presents(binding, n, seq)
        shape = (n, 1, self.bundle.manifest.text.vocab_size)
        logits = scratch_buffer(self._scratch, "logits", shape, self.kv.dtype)
        binding.bind_output(
            "logits", "cpu", element_type=logits.dtype, shape=shape, buffer_ptr=logits.ctypes.data
        )
        self.session.run_with_iobinding(binding)
        return self.kv.presents(binding, bound), logits

    def _prefill_batch(self) -> None:
        """One run over every prefilling row: ``S = prefill_chunk_tokens // k`` tokens each (at most
        what is left, and stopping at prefix-cache snapshot lengths); rows that finish their prompt
        sample their first token and move to the decoding rows."""
        seqs = self._prefilling
        base, k = len(self._decoding), len(seqs)
        step = max(
            1, min(self.settings.prefill_chunk_tokens // k, max(s.prompt_len - s.cursor for s in seqs))
        )
        ends = []
        for seq in seqs:
            end = min(seq.prompt_len, seq.cursor + step)
            for point in seq.snapshots:  # stop exactly at snapshot lengths
                if seq.cursor < point < end:
                    end = point
                    break
            ends.append(end)
        valid = np.array([end - seq.cursor for seq, end in zip(seqs, ends, strict=True)], dtype=np.int64)
        width = int(valid.max())
        hidden, per_layer_shape = seqs[0].embeds.shape[1], seqs[0].per_layer.shape[1:]
        embeds = np.zeros((k, width, hidden), dtype=seqs[0].embeds.dtype)
        per_layer = np.zeros((k, width, *per_layer_shape), dtype=seqs[0].per_layer.dtype)
        for j, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            embeds[j, : end - seq.cursor] = seq.embeds[seq.cursor : end]
            per_layer[j, : end - seq.cursor] = seq.per_layer[seq.cursor : end]
        # Padding continues each row's positions: real queries never see it (it comes after them),
        # and padded queries still see their own key (no all-masked softmax row, no NaN).
        positions = self.kv.lengths[base : base + k, None] + np.arange(width, dtype=np.int64)[None]
        logits = self._run_step(slice(base, base + k), embeds, per_layer, positions, valid)
        done = []
        for j, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            seq.cursor = end
            if end in seq.snapshots and not self.prefix_cache.contains(
                seq.req.prefix_cache_key, seq.keys[:end]
            ):
                self.prefix_cache.store(seq.req.prefix_cache_key, seq.keys[:end], self.kv.snapshot(base + j))
                self.metrics.prefix_cache_bytes.set(self.prefix_cache.bytes)
            if end == seq.prompt_len:
                done.append(j)
        if not done:
            return
        # Finished rows first (they become decoding rows), the others keep prefilling after them.
        order = done + [j for j in range(k) if j not in done]
        self.kv.permute_rows(base, order)
        self._prefilling = [seqs[j] for j in order[len(done) :]]
        first = len(self._decoding)
        self._decoding += [seqs[j] for j in done]
        # Reversed, as in a decode step: a sequence done at its first token moves only later rows.
        for offset in reversed(range(len(done))):
            seq = seqs[done[offset]]
            self.metrics.prompt_tokens.inc(seq.prompt_len)
            self._accept(first + offset, seq, logits[done[offset]])

    def _decode_step(self) -> None:
        n = len(self._decoding)
        tokens = np.array([[s.last_token] for s in self._decoding], dtype=np.int64)
        embeds, per_layer = self.bundle.embed(tokens)
        positions = self.kv.lengths[:n, None].copy()
        logits = self._run_step(slice(0, n), embeds, per_layer, positions)
        self.metrics.batch_size.observe(n)
        for row in reversed(range(n)):  # reversed: removing a finished row moves only later rows
            self._accept(row, self._decoding[row], logits[row])

    def _accept(self, row: int, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the next token of ``seq`` (at ``row``), stream its text, retire it when finished."""
        token = seq.sampler(logits)
        now = time.monotonic()
        if seq.first_token_at == 0.0:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.last_token = token
        self.metrics.generated_tokens.inc()
        for delta in seq.processor.push(token):
            seq.handle.emit(delta)
        reason = seq.processor.finish_reason
        if reason is None and seq.handle.cancelled:
            return  # dropped at the next step boundary
        if reason is None:
            return
        pending = seq.processor.pending_token_ids
        if pending:  # ids that produced no text (the stop token, thoughts dropped with thinking off)
            seq.handle.emit(Delta(Channel.ANSWER, "", pending))
        decode_s = now - seq.first_token_at
        generated = seq.processor.generated
        seq.handle.emit(
            Finished(
                reason=reason,
                prompt_tokens=seq.prompt_len,
                completion_tokens=generated,
                cached_prompt_tokens=seq.cached,
                ttft_s=seq.first_token_at - seq.arrival,
                decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
                queue_s=seq.admitted - seq.arrival,
                total_s=now - seq.arrival,
            )
        )
        self.metrics.requests.labels(reason.value).inc()
        self._remove_row(row)
        self.metrics.active.set(len(self._decoding) + len(self._prefilling))
        self.metrics.kv_cache_bytes.set(self.kv.nbytes())
