"""Cross-request batching with a bounded wait: items from many calls share one encoder run.

`Batcher` keeps one FIFO queue. Its loop takes the oldest item, waits until ``max_batch_size`` items
are queued or the oldest has waited ``max_wait_ms`` (whichever is first), runs ``run(items)`` on an
executor thread, and resolves each caller's future with its own result, in order. Callers that are
cancelled while queued are skipped; a full queue refuses new items with ``Overloaded``; an exception in
``run`` fails every item of that batch. The model call is injected (``run``), so the policy is tested
with fakes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from gemma_mesh.common.errors import EngineDead, Overloaded

I = TypeVar("I")  # noqa: E741 - item
R = TypeVar("R")  # result


@dataclass
class _Entry(Generic[I, R]):
    item: I
    future: asyncio.Future[R]
    enqueued_s: float


@dataclass(frozen=True)
class BatchStats:
    """What one run looked like: items, the oldest item's queue wait and the run time, in seconds."""

    size: int
    wait_s: float
    run_s: float


class Batcher(Generic[I, R]):
    """Batch ``submit``-ted items into ``run`` calls.

    Args:
        run: items -> one result per item, same order (runs on ``executor``; may raise).
        max_batch_size: most items per run.
        max_wait_ms: longest the oldest queued item waits for company before its batch runs.
        max_queue: most items queued (not yet running); ``submit`` beyond it raises ``Overloaded``.
        executor: where ``run`` executes (None = the loop's default executor).
        on_batch: called on the event loop after each run with its `BatchStats` (metrics).
        on_queue: called with the queue depth whenever it changes (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[I]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        executor: Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.executor = executor
        self.on_batch = on_batch
        self.on_queue = on_queue
        self._queue: deque[_Entry[I, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop (idempotent)."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="vision-batcher")

    async def close(self) -> None:
        """Stop the loop; queued items fail with ``EngineDead``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(EngineDead("the vision encoder is shutting down"))
        self._report_queue()

    @property
    def queued(self) -> int:
        """Items waiting for a run."""
        return len(self._queue)

    async def submit(self, item: I) -> R:
        """Queue one item and wait for its result. Raises Overloaded when the queue is full."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[I]) -> list[R]:
        """Queue several items at once (all or none) and wait for their results, in order."""
        if self._task is None or self._wakeup is None:
            raise EngineDead("the vision batcher is not running")
        if len(self._queue) + len(items) > self.max_queue:
            raise Overloaded(
                f"the vision encoder queue holds {len(self._queue)} images; {len(items)} more would pass "
                f"the limit of {self.max_queue}"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [_Entry(item, loop.create_future(), now) for item in items]
        self._queue.extend(entries)
        self._report_queue()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except BaseException:
            for e in entries:
                if not e.future.cancel() and not e.future.cancelled():
                    e.future.exception()  # mark retrieved: the first failure is raised below
            raise

    # --------------------------------------------------------------------------------- loop
    def _report_queue(self) -> None:
        if self.on_queue is not None:
            self.on_queue(len(self._queue))

    def _live(self) -> int:
        return sum(1 for e in self._queue if not e.future.done())

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].enqueued_s + self.max_wait_s
            while self._live() < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch: list[_Entry[I, R]] = []
            while self._queue and len(batch) < self.max_batch_size:
                entry = self._queue.popleft()
                if not entry.future.done():  # skip callers cancelled while queued
                    batch.append(entry)
            self._report_queue()
            if not batch:
                continue
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.run, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch run returned {len(results)} results for {len(batch)} items")
            except Exception as exc:
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
            else:
                for e, result in zip(batch, results, strict=True):
                    if not e.future.done():
                        e.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(
                    BatchStats(len(batch), started - batch[0].enqueued_s, time.monotonic() - started)
                )
