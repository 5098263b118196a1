"""``vision.batcher``: bounded wait, size cap, per-caller results, cancellation, overload, failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from gemma_mesh.common.errors import EngineDead, Overloaded
from gemma_mesh.vision.batcher import Batcher, BatchStats

pytestmark = pytest.mark.asyncio


def _batcher(run=None, **kw):
    runs: list[list[int]] = []
    stats: list[BatchStats] = []

    def default_run(items):
        runs.append(list(items))
        return [i * 10 for i in items]

    kw = {"max_batch_size": 4, "max_wait_ms": 30.0, "max_queue": 16, **kw}
    batcher = Batcher(run or default_run, on_batch=stats.append, **kw)
    batcher.start()
    return batcher, runs, stats


async def test_concurrent_callers_share_runs_and_get_their_own_results():
    batcher, runs, stats = _batcher()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert [len(r) for r in runs] == [4, 4, 2] and sorted(i for r in runs for i in r) == list(range(10))
    assert [s.size for s in stats] == [4, 4, 2]
    await batcher.close()


async def test_a_lone_item_waits_at_most_the_bound():
    batcher, _, stats = _batcher(max_wait_ms=50.0)
    start = time.monotonic()
    assert await batcher.submit(7) == 70
    assert 0.04 <= time.monotonic() - start < 1.0 and stats[0].wait_s >= 0.04
    batcher2, _, _ = _batcher(max_wait_ms=0.0)
    start = time.monotonic()
    assert await batcher2.submit(1) == 10 and time.monotonic() - start < 0.5
    await batcher.close()
    await batcher2.close()


async def test_submit_many_keeps_order():
    batcher, _, _ = _batcher()
    assert await batcher.submit_many([3, 1, 2, 5, 4, 6]) == [30, 10, 20, 50, 40, 60]
    await batcher.close()


async def test_full_queue_is_overloaded_and_failures_reach_every_caller():
    batcher, _, _ = _batcher(max_queue=3)
    with pytest.raises(Overloaded, match="limit of 3"):
        await batcher.submit_many([1, 2, 3, 4])
    await batcher.close()

    def boom(items):
        raise ValueError("encoder failed")

    failing, _, _ = _batcher(run=boom)
    results = await asyncio.gather(failing.submit(1), failing.submit(2), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert await asyncio.gather(failing.submit(3), return_exceptions=True)  # loop still alive
    await failing.close()


async def test_cancelled_callers_are_skipped():
    batcher, runs, _ = _batcher(max_wait_ms=100.0)
    task = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    task.cancel()
    assert await batcher.submit(2) == 20
    assert runs == [[2]]
    await batcher.close()


async def test_closed_batcher_refuses_items():
    batcher, _, _ = _batcher()
    await batcher.close()
    with pytest.raises(EngineDead):
        await batcher.submit(1)
