"""PrefixCache and snapshot_lengths: pure logic, no model."""

from __future__ import annotations

import numpy as np

from gemma_mesh.decoder.kv_cache import RowSnapshot
from gemma_mesh.decoder.prefix_cache import PrefixCache, snapshot_lengths


def _snap(length: int) -> RowSnapshot:
    return RowSnapshot(length=length, full={}, ring={}, ring_positions=np.zeros(4, np.int64))


def test_snapshots_are_exact_at_boundaries_and_block_aligned_before_the_last_token():
    assert snapshot_lengths(100, [7, 61], block_tokens=16) == [7, 61, 96]
    assert snapshot_lengths(97, [0, 97, 130], block_tokens=16) == [96]  # outside (0, n) is dropped
    assert snapshot_lengths(16, [], block_tokens=16) == []  # the last token is always prefilled


def test_lookup_finds_the_longest_cached_prefix_among_many_lengths():
    cache = PrefixCache(1 << 20, block_tokens=16)
    keys = np.arange(500, dtype=np.int64)
    for n in range(1, 400, 3):
        cache.store("ns", keys[:n], _snap(n))
    assert cache.lookup("ns", keys[:200]).length == 199
    assert cache.lookup("ns", keys[:2]).length == 1
    other = keys.copy()
    other[150] = -5  # diverges at 150: the longest agreeing cached prefix is 148
    assert cache.lookup("ns", other[:300]).length == 148
    assert cache.lookup("other", keys[:200]) is None  # namespaces never share
    assert cache.lookup("ns", keys[:1]) is None  # only prefixes shorter than the prompt
    assert cache.stats.hits == 3 and cache.stats.lookups == 5


def test_lookup_digest_equals_the_one_shot_key():
    cache = PrefixCache(1 << 20)
    keys = np.array([5, -9, 3, 3, 8], dtype=np.int64)
    cache.store("k", keys[:3], _snap(3))
    assert PrefixCache._key("k", keys[:3]) in cache._entries
    assert cache.lookup("k", keys).length == 3
