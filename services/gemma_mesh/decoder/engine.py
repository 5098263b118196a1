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

**Predicted outputs** (OpenAI's ``prediction``; speculative decoding with a draft the caller
supplies, as vLLM's n-gram proposer does with one found in the prompt): a request may carry the
tokens it expects to generate, such as a live caption's previous hypothesis. They are prefilled
after the prompt, with logits at every predicted position, and accepted while the row's own sampler
picks exactly the predicted token; the first token it picks differently ends the prediction and the
row decodes on from there. Keys and values are committed only for accepted tokens (a rejected token
never enters the cache, nor overwrites a sliding-window slot still in use), and the sampler draws
once per token as in plain decoding, so the output is the same as without a prediction, in one
prefill run per ``prediction_block_tokens`` accepted instead of one step per token.

**Constrained rows** (``GenerationRequest.constraint``): their token masks are computed by
llguidance on a helper thread while the step runs (``grammar.GrammarMasker``) and applied to their
logits before their samplers; every token a row takes, predicted ones included, advances its
grammar. Unconstrained rows are untouched.

Rows ``0 .. n_decoding-1`` decode; rows ``n_decoding ..`` are being prefilled. Each sequence sees
only its own keys (the masks come from its own length and ring), so batched greedy output equals
the solo run's. Requests talk to the engine through ``RequestHandle`` (thread-safe event queue);
a request's ``stream_interval_tokens`` holds its deltas until they carry that many tokens (vLLM's
stream interval), for callers that read the text rather than each token.

**Health.** Both graphs load in ``__init__`` (``server.warm_up`` then runs one request). A step that
raises fails its requests, not the server; ``unhealthy_after_failed_steps`` in a row (a broken
session), or the scheduler thread dying, calls ``on_broken(reason)`` once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from typing import Any

import numpy as np

from gemma_mesh.common.errors import InvalidRequest, MeshError, Overloaded
from gemma_mesh.common.health import FailedStepStreak
from gemma_mesh.common.logging import get_logger
from gemma_mesh.decoder.grammar import GrammarCompiler, GrammarMasker
from gemma_mesh.decoder.kv_cache import scratch_buffer
from gemma_mesh.decoder.kv_storage import make_kv_cache
from gemma_mesh.decoder.metrics import DecoderMetrics
from gemma_mesh.decoder.output import Channel, Delta
from gemma_mesh.decoder.prefix_cache import PrefixCache
from gemma_mesh.decoder.request import Finished, GenerationRequest, RequestHandle, deliver
from gemma_mesh.decoder.sequence import Sequence
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.model.bundle import ModelBundle

__all__ = ["Engine", "Finished", "GenerationRequest", "RequestHandle"]

log = get_logger("decoder.engine")


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
        bundle.session("embed_tokens")  # loaded now, not by the first request after SERVING
        self._scratch: dict[str, np.ndarray] = {}  # I/O-binding output buffers, by output name
        self.kv = make_kv_cache(self.session, manifest, settings, bundle.float_dtype)
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes, settings.prefix_block_tokens)
        tokens = manifest.special_tokens
        self.channel_ids = (
            tokens["channel_start"].id if "channel_start" in tokens else None,
            tokens["channel_end"].id if "channel_end" in tokens else None,
        )
        self.turn_start_id = tokens["turn_start"].id if "turn_start" in tokens else None
        self.tool_call_marker_ids = tuple(
            tokens[name].id
            for name in ("tool_call_start", "tool_call_end", "string_delimiter")
            if name in tokens
        )
        self.grammars = GrammarCompiler(
            bundle.tokenizer,
            vocab_size=manifest.text.vocab_size,
            stop_token_ids=manifest.stop_token_ids,
            cache_size=settings.grammar_cache_size,
            json_whitespace_flexible=settings.grammar_json_whitespace_flexible,
            max_grammar_size=settings.max_grammar_size,
        )
        self.masker = GrammarMasker(
            manifest.text.vocab_size, settings.max_batch_size, settings.grammar_threads
        )
        self.max_context = settings.max_context_tokens or manifest.text.max_position_embeddings
        # A heap of (priority, arrival number, handle): admission order.
        self._waiting: list[tuple[int, int, RequestHandle]] = []
        self._arrivals = itertools.count()
        self._decoding: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # rows len(_decoding) .. in order
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
        self.failed_steps = FailedStepStreak(settings.unhealthy_after_failed_steps)
        # Called once, from the engine thread, when the engine can no longer serve.
        self.on_broken: Any = None

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self.masker.close()

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
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the callers' loop is closed: nobody listens any more
                for _, _, cancelled in items:
                    cancelled.set()

    # ------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the loop itself: nothing will serve again
            log.exception("engine thread died")
            self._report_broken(f"the engine thread died: {type(exc).__name__}: {exc}")
            raise

    def _report_broken(self, reason: str) -> None:
        if self.on_broken is not None:
            self.on_broken(reason)

    def _loop(self) -> None:
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
                self.failed_steps.record(True)
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("engine step failed", failed_in_a_row=self.failed_steps.count + 1)
                self.metrics.failed_steps.inc()
                self._fail_all(MeshError(f"decoder step failed: {type(exc).__name__}: {exc}"))
                if self.failed_steps.record(False):
                    self._report_broken(
                        f"{self.failed_steps.count} engine steps failed in a row "
                        f"(unhealthy_after_failed_steps); last: {type(exc).__name__}: {exc}"
                    )
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
                seq = Sequence(handle, self)
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
        logits_at: np.ndarray,
    ) -> tuple[np.ndarray, dict]:
        """One decoder run over ``rows`` -> (logits ``[n, K, V]`` at the step indices ``logits_at
        [n, K]``, the step's presents). The caller commits the presents (``kv.commit``) before the
        next run: only then does it know how many of each row's step tokens to keep."""
        seq = positions.shape[1]
        self.kv.reserve(int(self.kv.lengths[rows].max()) + seq)
        full, sliding = self.kv.masks(rows, positions)
        feeds = {
            "inputs_embeds": embeds,
            "per_layer_inputs": per_layer,
            "attention_mask": full,
            "sliding_attention_mask": sliding,
            "position_ids": positions,
            # The LM head runs only where a token is sampled (a prefill skips it elsewhere).
            "logits_indices": logits_at,
        }
        presents, logits = self._run_bound(feeds, rows, logits_at.shape[1])
        self.steps += 1
        return logits, presents

    def _run_bound(self, feeds: dict[str, np.ndarray], rows: slice, k: int) -> tuple[dict, np.ndarray]:
        """Run the decoder with I/O binding: host inputs are bound zero-copy from numpy, the KV cache
        binds its own buffers (host arrays, or OrtValues on the device), logits go into a reusable
        host buffer. Returns ``(presents, logits [n, k, V])``."""
        n = rows.stop - rows.start
        seq = feeds["position_ids"].shape[1]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.kv.bind_past(binding, rows)
        bound = self.kv.bind_presents(binding, n, seq)
        shape = (n, k, self.bundle.manifest.text.vocab_size)
        logits = scratch_buffer(self._scratch, "logits", shape, self.kv.dtype)
        binding.bind_output(
            "logits", "cpu", element_type=logits.dtype, shape=shape, buffer_ptr=logits.ctypes.data
        )
        self.session.run_with_iobinding(binding)
        return self.kv.presents(binding, bound), logits

    def _prefill_batch(self) -> None:
        """One run over every prefilling row: ``S = prefill_chunk_tokens // k`` tokens each (at most
        what is left of prompt and prediction, at most ``prediction_block_tokens`` predicted tokens).
        The run goes through prefix-cache snapshot lengths: its keys/values are committed in pieces
        that end there (``_commit_with_snapshots``), so a prompt is not cut into more runs than its
        chunk budget needs.

        A row whose chunk reaches its prompt's last token samples from there on; with a prediction
        it walks the predicted tokens (``_walk_prediction``). Rows whose walk ended move to the
        decoding rows; a row whose whole chunk was accepted goes on prefilling its prediction.
        """
        seqs = self._prefilling
        base, k = len(self._decoding), len(seqs)
        step = max(1, min(self.settings.prefill_chunk_tokens // k, max(s.input_len - s.cursor for s in seqs)))
        ends = []
        block = self.settings.prediction_block_tokens
        for seq in seqs:
            # A run verifies at most one block of the prediction: the next only once it was all accepted.
            ends.append(min(seq.input_len, seq.cursor + step, max(seq.cursor, seq.prompt_len) + block))
        valid = np.array([end - seq.cursor for seq, end in zip(seqs, ends, strict=True)], dtype=np.int64)
        width = int(valid.max())
        hidden, per_layer_shape = seqs[0].embeds.shape[1], seqs[0].per_layer.shape[1:]
        embeds = np.zeros((k, width, hidden), dtype=seqs[0].embeds.dtype)
        per_layer = np.zeros((k, width, *per_layer_shape), dtype=seqs[0].per_layer.dtype)
        # Logits from the prompt's last token on (the first is the first generated token's).
        first = [max(seq.cursor, seq.prompt_len - 1) for seq in seqs]
        wanted = [max(0, end - f) for f, end in zip(first, ends, strict=True)]
        logits_at = np.zeros((k, max(1, *wanted)), dtype=np.int64)
        for j, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            embeds[j, : end - seq.cursor] = seq.embeds[seq.cursor : end]
            per_layer[j, : end - seq.cursor] = seq.per_layer[seq.cursor : end]
            if wanted[j]:
                at = np.arange(first[j], end) - seq.cursor
                logits_at[j] = np.concatenate([at, np.full(logits_at.shape[1] - at.size, at[-1])])
            else:
                logits_at[j] = valid[j] - 1
        # Padding continues each row's positions: real queries never see it (it comes after them),
        # and padded queries still see their own key (no all-masked softmax row, no NaN).
        positions = self.kv.lengths[base : base + k, None] + np.arange(width, dtype=np.int64)[None]
        # Constrained rows that sample in this run: their first position's mask is computed while
        # the decoder runs (the grammar state is the one after the prompt).
        masks = self.masker.start(
            [(j, seq.grammar) for j, seq in enumerate(seqs) if wanted[j] and seq.grammar is not None]
        )
        logits, presents = self._run_step(slice(base, base + k), embeds, per_layer, positions, logits_at)
        masks.apply(logits[:, 0])
        # Sample before committing: only a predicted token the sampler picked is kept.
        done, finished = [], set()
        for j, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            if wanted[j]:
                ended, fin = self._walk_prediction(seq, first[j], end, logits[j])
                if ended:
                    done.append(j)
                if fin:
                    finished.add(j)
            valid[j] = min(end, seq.confirmed) - seq.cursor
        self._commit_with_snapshots(base, positions, presents, valid)
        if not done:
            return
        # Finished rows first (they become decoding rows), the others keep prefilling after them.
        order = done + [j for j in range(k) if j not in done]
        self.kv.permute_rows(base, order)
        self._prefilling = [seqs[j] for j in order[len(done) :]]
        first_row = len(self._decoding)
        self._decoding += [seqs[j] for j in done]
        # Reversed, as in a decode step: a sequence done at its first token moves only later rows.
        for offset in reversed(range(len(done))):
            seq = seqs[done[offset]]
            self.metrics.prompt_tokens.inc(seq.prompt_len)
            if seq.prediction.size:
                self.metrics.prediction_tokens.labels("accepted").inc(seq.accepted_prediction)
                self.metrics.prediction_tokens.labels("rejected").inc(
                    seq.prediction.size - seq.accepted_prediction
                )
            if done[offset] in finished:
                self._retire(first_row + offset, seq)

    def _commit_with_snapshots(
        self, base: int, positions: np.ndarray, presents: dict, valid: np.ndarray
    ) -> None:
        """Commit the first ``valid [k]`` step tokens of prefilling rows ``base ..`` and advance
        their cursors, storing a prefix-cache snapshot at each snapshot length the step passes.

        The step is committed in pieces: each piece ends at a row's next snapshot length (or its
        last valid token), and a row that reached a snapshot length is snapshotted before the next
        piece. A snapshot is therefore exactly the state after its prefix, as if the run had
        stopped there (the sliding layers' ring still holds the window before it).
        """
        seqs = self._prefilling
        k = len(seqs)
        rows = slice(base, base + k)
        starts = [seq.cursor for seq in seqs]
        done = np.zeros(k, dtype=np.int64)  # step tokens committed so far, per row
        while True:
            cut = done.copy()
            for j, seq in enumerate(seqs):
                start, stop = starts[j] + int(done[j]), starts[j] + int(valid[j])
                cut[j] = next((p for p in seq.snapshots if start < p < stop), stop) - starts[j]
            if not (cut > done).any():
                return
            self.kv.commit(rows, positions, presents, cut - done, first=done)
            for j, seq in enumerate(seqs):
                seq.cursor = starts[j] + int(cut[j])
                if cut[j] > done[j] and seq.cursor in seq.snapshots:
                    self._store_snapshot(base + j, seq)
            done = cut

    def _store_snapshot(self, row: int, seq: Sequence) -> None:
        keys = seq.keys[: seq.cursor]
        if not self.prefix_cache.contains(seq.req.prefix_cache_key, keys):
            self.prefix_cache.store(seq.req.prefix_cache_key, keys, self.kv.snapshot(row))
            self.metrics.prefix_cache_bytes.set(self.prefix_cache.bytes)

    def _walk_prediction(self, seq: Sequence, first: int, end: int, logits: np.ndarray) -> tuple[bool, bool]:
        """Sample ``seq``'s tokens at positions ``first .. end - 1`` (``logits [>= end - first, V]``)
        while each picks the predicted token that follows; stream them. Returns ``(ended,
        finished)``: ``ended`` when the walk stopped in this chunk (a token other than the predicted
        one, the prediction used up, or the request finished), so the row decodes from here on;
        ``finished`` when the request is complete. Advances ``seq.confirmed`` over accepted tokens.
        """
        for i, position in enumerate(range(first, end)):
            if i and seq.grammar is not None:  # the first position was masked during the run
                self.masker.mask_now(seq.grammar, logits[i])
            token = seq.sample(logits[i])
            if self._push(seq, token):
                return True, True
            index = position + 1 - seq.prompt_len  # the prediction's token at position + 1
            if index < seq.prediction.shape[0] and token == seq.prediction[index]:
                seq.confirmed += 1
                continue
            return True, False
        return False, False

    def _decode_step(self) -> None:
        n = len(self._decoding)
        tokens = np.array([[s.last_token] for s in self._decoding], dtype=np.int64)
        embeds, per_layer = self.bundle.embed(tokens)
        positions = self.kv.lengths[:n, None].copy()
        # Token masks of constrained rows, on a helper thread while ONNX Runtime runs the step.
        masks = self.masker.start(
            [(row, seq.grammar) for row, seq in enumerate(self._decoding) if seq.grammar is not None]
        )
        logits, presents = self._run_step(
            slice(0, n), embeds, per_layer, positions, np.zeros((n, 1), dtype=np.int64)
        )
        masks.apply(logits[:, 0])
        self.kv.commit(slice(0, n), positions, presents)
        self.metrics.batch_size.observe(n)
        for row in reversed(range(n)):  # reversed: removing a finished row moves only later rows
            seq = self._decoding[row]
            if self._push(seq, seq.sample(logits[row, 0])):
                self._retire(row, seq)

    def _push(self, seq: Sequence, token: int) -> bool:
        """Record ``token`` as ``seq``'s next token and stream its text -> True when ``seq`` is finished."""
        now = time.monotonic()
        if seq.first_token_at == 0.0:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.last_token = token
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if seq.budget is not None:
            seq.budget.accept(token)
        self.metrics.generated_tokens.inc()
        for delta in seq.processor.push(token):
            self._stream(seq, seq.attach_logprobs(delta))
        # A cancelled request is dropped at the next step boundary (_drop_cancelled).
        return seq.processor.finish_reason is not None

    @staticmethod
    def _stream(seq: Sequence, delta: Delta) -> None:
        """Send ``delta``, or hold it until the held deltas carry ``stream_interval_tokens`` ids
        (merged in order on one channel; a delta on another channel sends the held ones first)."""
        interval = seq.req.stream_interval_tokens
        if interval <= 1:
            seq.handle.emit(delta)
            return
        held = seq.held
        if held is not None and held.channel != delta.channel:
            seq.handle.emit(held)
            held = None
        if held is not None:
            delta = Delta(
                delta.channel,
                held.text + delta.text,
                [*held.token_ids, *delta.token_ids],
                [*held.logprobs, *delta.logprobs],
            )
        if len(delta.token_ids) >= interval:
            seq.handle.emit(delta)
            seq.held = None
        else:
            seq.held = delta

    def _retire(self, row: int, seq: Sequence) -> None:
        """Send ``seq``'s ``Finished`` and free its decoding row ``row``."""
        now = time.monotonic()
        reason = seq.processor.finish_reason
        assert reason is not None
        pending = seq.processor.pending_token_ids
        if pending:  # ids that produced no text (the stop token, thoughts dropped with thinking off)
            self._stream(seq, seq.attach_logprobs(Delta(Channel.ANSWER, "", pending)))
        if seq.held is not None:
            seq.handle.emit(seq.held)
            seq.held = None
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
                accepted_prediction_tokens=seq.accepted_prediction,
                rejected_prediction_tokens=int(seq.prediction.shape[0]) - seq.accepted_prediction,
            )
        )
        self.metrics.requests.labels(reason.value).inc()
        self._remove_row(row)
        self.metrics.active.set(len(self._decoding) + len(self._prefilling))
        self.metrics.kv_cache_bytes.set(self.kv.nbytes())
