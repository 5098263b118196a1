"""The decoder's preallocated, batched KV cache.

Layout (one array pair per layer that owns a cache, ``manifest.text.kv_layers``):

- full-attention layers: ``[max_batch, kvH, capacity, D]``; row ``b`` holds its sequence's keys at
  indices ``0 .. length_b - 1``; the rest is masked. ``capacity`` doubles when a row needs more.
- sliding layers: a ring of ``ring = min(window, capacity)`` slots ``[max_batch, kvH, ring, D]``;
  position ``p`` lives in slot ``p % window`` (while ``capacity < window`` every position is below
  ``ring``, so that slot exists). Keys are stored already rotated (RoPE), so slot order does not
  matter; only the mask does. A sliding layer therefore keeps at most the window (E4B: 20 of its 24
  cache-owning layers are sliding, so a token costs 16 KiB instead of 56 KiB once past the window),
  and short sequences do not attend over a mostly empty window.

Each step feeds whole rows ``[:n]`` (contiguous views, no copies) with boolean masks built from the
rows' lengths and ring positions; the graph returns only the step's keys/values (it never copies
the past), and ``commit`` writes them into their slots. Rows ``0 .. n-1`` are always
the active ones: a finished row is replaced by the last row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gemma_mesh.model.manifest import TextSection

EMPTY = -1  # ring slot without a key


@dataclass
class RowSnapshot:
    """The KV state of one sequence after its first ``length`` tokens (for the prefix cache)."""

    length: int
    full: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> ([kvH, length, D], [kvH, length, D])
    ring: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> ([kvH, ring, D], ...) (ring <= window)
    ring_positions: np.ndarray  # [window] int64

    @property
    def nbytes(self) -> int:
        arrays = [a for pair in (*self.full.values(), *self.ring.values()) for a in pair]
        return sum(a.nbytes for a in arrays) + self.ring_positions.nbytes


class BatchKVCache:
    """Preallocated KV storage for up to ``max_batch`` sequences.

    Args:
        text: the manifest's decoder section (layer types, KV heads, head dims, window).
        max_batch: rows.
        dtype: float dtype of the decoder graph.
        initial_capacity: tokens per row for full-attention layers before the first growth.
    """

    def __init__(
        self, text: TextSection, max_batch: int, dtype: np.dtype, initial_capacity: int = 256
    ) -> None:
        self.text = text
        self.max_batch = max_batch
        self.dtype = np.dtype(dtype)
        self.window = text.sliding_window
        self.full_layers = [i for i in text.kv_layers if text.layers[i].type != "sliding_attention"]
        self.sliding_layers = [i for i in text.kv_layers if text.layers[i].type == "sliding_attention"]
        self._present_scratch: dict[str, np.ndarray] = {}
        self.capacity = 0
        self.ring = 0  # slots of the sliding layers: min(window, capacity)
        self.keys: dict[int, np.ndarray] = {}
        self.values: dict[int, np.ndarray] = {}
        self.lengths = np.zeros(max_batch, dtype=np.int64)
        self.ring_positions = np.full((max_batch, self.window), EMPTY, dtype=np.int64)
        self._grow(initial_capacity)

    # ------------------------------------------------------------------ sizes
    def _grow(self, capacity: int) -> None:
        ring = min(self.window, capacity)
        for i in self.text.kv_layers:
            layer = self.text.layers[i]
            old, size = (self.ring, ring) if i in self.sliding_layers else (self.capacity, capacity)
            if size == old and i in self.keys:
                continue
            shape = (self.max_batch, layer.num_key_value_heads, size, layer.head_dim)
            for store in (self.keys, self.values):
                new = np.zeros(shape, dtype=self.dtype)
                if i in store:
                    new[:, :, :old] = store[i]
                store[i] = new
        self.capacity, self.ring = capacity, ring

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` keys per row in the full-attention layers (capacity doubles)."""
        if tokens > self.capacity:
            capacity = max(self.capacity, 1)
            while capacity < tokens:
                capacity *= 2
            self._grow(capacity)

    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(a.nbytes for a in self.keys.values()) + sum(a.nbytes for a in self.values.values())

    def bytes_per_token(self) -> dict[str, int]:
        """KV bytes one token costs in full-attention layers and, until the window is full, in sliding ones."""

        def cost(layers: list[int]) -> int:
            return sum(
                2
                * self.text.layers[i].num_key_value_heads
                * self.text.layers[i].head_dim
                * self.dtype.itemsize
                for i in layers
            )

        return {"full": cost(self.full_layers), "sliding": cost(self.sliding_layers)}

    # ------------------------------------------------------------------- rows
    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0
        self.ring_positions[row] = EMPTY

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst`` (compaction after a sequence leaves)."""
        if src == dst:
            return
        used = int(self.lengths[src])
        for i in self.full_layers:
            self.keys[i][dst, :, :used] = self.keys[i][src, :, :used]
            self.values[i][dst, :, :used] = self.values[i][src, :, :used]
        for i in self.sliding_layers:
            self.keys[i][dst] = self.keys[i][src]
            self.values[i][dst] = self.values[i][src]
        self.lengths[dst] = used
        self.ring_positions[dst] = self.ring_positions[src]

    def feeds(self, rows: slice) -> dict[str, np.ndarray]:
        """``past_key_values.*`` inputs for the rows (views of the buffers, no copies)."""
        out = {}
        for i in self.text.kv_layers:
            out[f"past_key_values.{i}.key"] = self.keys[i][rows]
            out[f"past_key_values.{i}.value"] = self.values[i][rows]
        return out

    def bind_past(self, binding, rows: slice) -> None:
        """Bind ``past_key_values.*`` of ``rows`` to an ONNX Runtime IOBinding (zero-copy views)."""
        for name, value in self.feeds(rows).items():
            binding.bind_cpu_input(name, value)

    def bind_presents(self, binding, n: int, seq: int) -> dict[str, np.ndarray]:
        """Bind each ``present.*`` output (``[n, kvH, seq, D]``) to a reusable host buffer -> the buffers."""
        out = {}
        for i in self.text.kv_layers:
            layer = self.text.layers[i]
            shape = (n, layer.num_key_value_heads, seq, layer.head_dim)
            for part in ("key", "value"):
                name = f"present.{i}.{part}"
                array = scratch_buffer(self._present_scratch, name, shape, self.dtype)
                binding.bind_output(
                    name, "cpu", element_type=self.dtype, shape=shape, buffer_ptr=array.ctypes.data
                )
                out[name] = array
        return out

    def presents(self, binding, bound: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step's ``present.*`` values after the run (``bound``: what ``bind_presents`` returned)."""
        return bound

    def masks(self, rows: slice, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks for queries at ``positions [n, S]`` (each row's next positions, in order).

        Full layers see every stored key of the row and the step's own keys causally; sliding layers
        see ring keys and the step's keys less than ``window`` positions back.

        Returns:
            ``(attention_mask [n, 1, S, capacity + S], sliding_attention_mask [n, 1, S, ring + S])``.
        """
        lengths = self.lengths[rows]
        n, seq = positions.shape
        q = positions[:, :, None]  # [n, S, 1]
        step_k = positions[:, None, :]  # [n, 1, S]
        step_causal = step_k <= q  # [n, S, S]
        stored = np.arange(self.capacity)[None, None, :] < lengths[:, None, None]  # [n, 1, cap]
        full = np.concatenate([np.broadcast_to(stored, (n, seq, self.capacity)), step_causal], axis=2)
        ring = self.ring_positions[rows, : self.ring][:, None, :]  # [n, 1, ring]
        ring_ok = (ring != EMPTY) & (q - ring < self.window) & (ring <= q)
        step_ok = step_causal & (q - step_k < self.window)
        sliding = np.concatenate([ring_ok, step_ok], axis=2)
        return full[:, None], sliding[:, None]

    def commit(
        self,
        rows: slice,
        positions: np.ndarray,
        presents: dict[str, np.ndarray],
        valid: np.ndarray | None = None,
        first: np.ndarray | None = None,
    ) -> None:
        """Store the step's new keys/values (each ``present`` output, ``[n, kvH, S, D]``).

        ``valid [n]`` (default: all ``S``) is how many step tokens of each row to store, from step
        index ``first [n]`` on (default 0); the rest is padding of a batched prefill (rows of
        different chunk lengths) or is stored by a later call (a step committed in pieces, so the
        prefix cache can snapshot a row between them). Pieces must be committed in order.
        """
        start = rows.start or 0
        n, seq = positions.shape
        row_index = np.arange(start, start + n)
        lengths = self.lengths[start : start + n]
        if (
            seq == 1 and valid is None and first is None
        ):  # decode: one vectorised scatter per layer for the whole batch
            slots = positions[:, 0] % self.window
            for i in self.text.kv_layers:
                dest = slots if i in self.sliding_layers else lengths
                for part, store in (("key", self.keys), ("value", self.values)):
                    store[i][row_index, :, dest] = presents[f"present.{i}.{part}"][:, :, 0]
            self.ring_positions[row_index, slots] = positions[:, 0]
            self.lengths[start : start + n] += 1
            return
        counts = np.full(n, seq, dtype=np.int64) if valid is None else np.asarray(valid, dtype=np.int64)
        offsets = np.zeros(n, dtype=np.int64) if first is None else np.asarray(first, dtype=np.int64)
        for r in range(n):
            count, offset = int(counts[r]), int(offsets[r])
            if count == 0:
                continue
            ring_tokens, slots = self.step_destinations(
                positions[r], count, int(lengths[r]), sliding=True, first=offset
            )
            full_tokens, full_slots = self.step_destinations(
                positions[r], count, int(lengths[r]), sliding=False, first=offset
            )
            for i in self.text.kv_layers:
                for part, store in (("key", self.keys), ("value", self.values)):
                    new = presents[f"present.{i}.{part}"][r]  # [kvH, S, D]
                    if i in self.sliding_layers:
                        store[i][start + r, :, slots] = np.moveaxis(new[:, ring_tokens], 1, 0)
                    else:
                        store[i][start + r, :, full_slots] = np.moveaxis(new[:, full_tokens], 1, 0)
            self.ring_positions[start + r, slots] = positions[r, ring_tokens]
        self.lengths[start : start + n] += counts

    def step_destinations(
        self, positions: np.ndarray, count: int, length: int, *, sliding: bool, first: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which of a row's step tokens ``first .. first + count - 1`` (``positions [S]``) a layer
        stores, and where.

        Full layers keep all of them after the row's ``length``; sliding layers keep only the last
        ``window`` (ring slot ``position % window``). Returns ``(token indices, slots)``, int64.
        """
        end = first + count
        if sliding:
            tokens = np.arange(end - min(count, self.window), end)
            return tokens, positions[tokens] % self.window
        tokens = np.arange(first, end)
        return tokens, length + tokens - first

    def permute_rows(self, start: int, order: Sequence[int]) -> None:
        """Rows ``start + j`` take the state of rows ``start + order[j]`` (a permutation of ``0..k-1``)."""
        order = np.asarray(order, dtype=np.int64)
        if np.array_equal(order, np.arange(order.size)):
            return
        src, dst = start + order, slice(start, start + order.size)
        for i in self.text.kv_layers:
            self.keys[i][dst] = self.keys[i][src]  # fancy indexing copies first: no aliasing
            self.values[i][dst] = self.values[i][src]
        self.lengths[dst] = self.lengths[src]
        self.ring_positions[dst] = self.ring_positions[src]

    # --------------------------------------------------------------- snapshots
    def snapshot(self, row: int) -> RowSnapshot:
        """A copy of row ``row``'s state (full keys up to its length, the ring)."""
        length = int(self.lengths[row])
        full = {
            i: (self.keys[i][row, :, :length].copy(), self.values[i][row, :, :length].copy())
            for i in self.full_layers
        }
        ring = {i: (self.keys[i][row].copy(), self.values[i][row].copy()) for i in self.sliding_layers}
        return RowSnapshot(
            length=length, full=full, ring=ring, ring_positions=self.ring_positions[row].copy()
        )

    def restore(self, row: int, snap: RowSnapshot) -> None:
        """Load ``snap`` into row ``row`` (reserving capacity as needed)."""
        self.reserve(snap.length)
        for i, (k, v) in snap.full.items():
            self.keys[i][row, :, : snap.length] = k
            self.values[i][row, :, : snap.length] = v
        for i, (k, v) in snap.ring.items():  # the ring may have grown since: the rest stays EMPTY
            self.keys[i][row, :, : k.shape[1]] = k
            self.values[i][row, :, : v.shape[1]] = v
        self.ring_positions[row] = snap.ring_positions
        self.lengths[row] = snap.length


def scratch_buffer(
    buffers: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """A ``shape`` view of a reusable buffer (doubled when too small)."""
    size = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size:
        buffer = buffers[name] = np.empty(max(size, 2 * (buffer.size if buffer is not None else 0)), dtype)
    return buffer[:size].reshape(shape)
