"""Prompt-prefix KV reuse: an LRU of ``RowSnapshot``s keyed by the prefix's content, bounded in bytes.

A prefix's key is a digest of its *token keys*: the token ids, except that every soft-token
position gets a value derived from a digest of that media's soft tokens (so two prompts with the
same placeholders but different images never share a cache). Snapshots are taken where later
prompts diverge: exactly at turn starts and at the first and one-past-the-last token of each
media item (a live caption's next partial decode extends the audio exactly there), and at the
block-aligned length (``block_tokens``) before the prompt's last token. A lookup hashes the prompt
once, incrementally, for every cached length. Pure: no model, no clock.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gemma_mesh.decoder.kv_cache import RowSnapshot


def row_digests(tokens: np.ndarray) -> np.ndarray:
    """A 62-bit digest of each soft token (row) of ``tokens`` ``[n, H]`` (dtype and width included) -> int64 ``[n]``."""
    rows = np.ascontiguousarray(tokens)
    head = str((rows.dtype.str, rows.shape[1:])).encode()
    out = np.empty(rows.shape[0], dtype=np.int64)
    for i in range(rows.shape[0]):
        h = hashlib.blake2b(head, digest_size=8)
        h.update(memoryview(rows[i]))
        out[i] = int.from_bytes(h.digest(), "little") >> 2
    return out


def token_keys(input_ids: np.ndarray, media: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Token ids with each media position replaced by ``-(1 + digest of its soft token)`` (never a real id).

    Keying each soft token by its own content (not the whole media's) lets a prompt whose audio
    extends an earlier prompt's audio (a live caption's successive partial decodes over a growing
    segment, fed by incremental encoding) reuse the earlier prompt's KV up to where they agree.

    Args:
        media: ``(positions [n] int64, soft tokens [n, H])`` per media item.
    """
    keys = np.asarray(input_ids, dtype=np.int64).copy()
    for positions, tokens in media:
        keys[positions] = -(1 + row_digests(tokens[: positions.shape[0]]))
    return keys


def snapshot_lengths(num_tokens: int, boundaries: Sequence[int], block_tokens: int) -> list[int]:
    """Prefix lengths worth snapshotting for a prompt: each of ``boundaries`` exactly (turn starts,
    the first and one-past-the-last media token: where later prompts diverge) and the block
    boundary before the final token (at least one token is always left to prefill, so the request
    gets logits)."""
    points = {((num_tokens - 1) // block_tokens) * block_tokens, *boundaries}
    return sorted(p for p in points if 0 < p < num_tokens)


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """LRU of snapshots, at most ``max_bytes`` in total (0 disables caching).

    Args:
        max_bytes: budget for stored keys/values.
        block_tokens: granularity of snapshot lengths.
    """

    def __init__(self, max_bytes: int, block_tokens: int = 16) -> None:
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._entries: OrderedDict[bytes, RowSnapshot] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self.bytes = 0
        self.stats = PrefixCacheStats()

    @staticmethod
    def _hasher(namespace: str) -> hashlib.blake2b:
        h = hashlib.blake2b(digest_size=16)
        h.update(namespace.encode())
        h.update(b"\0")
        return h

    @classmethod
    def _key(cls, namespace: str, keys: np.ndarray) -> bytes:
        h = cls._hasher(namespace)
        h.update(np.ascontiguousarray(keys, dtype=np.int64).tobytes())
        return h.digest()

    def lookup(self, namespace: str, keys: np.ndarray) -> RowSnapshot | None:
        """The snapshot of the longest cached prefix shorter than ``keys`` (None on a miss).

        The prompt is hashed once: the digest of each cached length comes from one incremental
        pass (the same digest ``_key`` gives that prefix), so a lookup costs the prompt's length
        plus one digest per distinct cached length, however many there are.
        """
        if self.max_bytes <= 0:
            return None
        self.stats.lookups += 1
        data = np.ascontiguousarray(keys, dtype=np.int64)
        h, done, candidates = self._hasher(namespace), 0, []
        for length in sorted(n for n in self._lengths if n < data.shape[0]):
            h.update(data[done:length].tobytes())
            done = length
            candidates.append((length, h.copy().digest()))
        for length, key in reversed(candidates):
            snap = self._entries.get(key)
            if snap is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self.stats.hit_tokens += length
                return snap
        return None

    def contains(self, namespace: str, keys: np.ndarray) -> bool:
        return self._key(namespace, keys) in self._entries

    def store(self, namespace: str, keys: np.ndarray, snap: RowSnapshot) -> None:
        """Insert ``snap`` (the state after ``keys``), evicting least recently used entries to fit."""
        if self.max_bytes <= 0 or snap.nbytes > self.max_bytes:
            return
        key = self._key(namespace, keys)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = snap
        self._lengths[snap.length] += 1
        self.bytes += snap.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self._lengths[old.length] -= 1
            if self._lengths[old.length] == 0:
                del self._lengths[old.length]

    def __len__(self) -> int:
        return len(self._entries)
