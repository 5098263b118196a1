"""Device-resident KV cache: ``BatchKVCache`` whose keys and values are ONNX Runtime ``OrtValue``s
on the decoder's device (CUDA with onnxruntime-gpu), so no decode step moves the cache between host
and device.

The decoder graph reads ``past_key_values.*`` straight from the device buffers (rows ``[a, b)`` of
a ``[max_batch, kvH, size, D]`` buffer are one contiguous range, bound by pointer) and writes the
step's ``present.*`` to device memory ORT allocates. Everything that changes the buffers runs as a
small ONNX graph on the same execution provider, with its output bound to its input buffer
(in-place ``ScatterND``; the kernels skip their input-to-output copy when both are the same buffer):

- ``commit``: ``GatherND`` the step's valid tokens from ``present`` and ``ScatterND`` them to their
  slots (full layers: after the row's length; sliding layers: ring slot ``position % window``);
- ``copy_rows``: row moves and permutations (continuous batching's compaction);
- ``grow``: ``Pad`` every buffer to a new capacity (new buffers, old contents copied on the device);
- ``read_row`` / ``write_row``: prefix-cache snapshots to host memory and their restore.

Only the bookkeeping (lengths, ring positions, masks, update indices) lives on the host, as in
``BatchKVCache``; outputs are token-for-token the host cache's (tested on the CPU provider with the
same code, ``kv_storage="device"``). This mirrors what vLLM and TensorRT-LLM do with a paged cache
and custom kernels, with ONNX ops only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from gemma_mesh.decoder.kv_cache import BatchKVCache, RowSnapshot
from gemma_mesh.model.manifest import TextSection

INT64_MAX = np.iinfo(np.int64).max
OPSET = 18


class DeviceKVCache(BatchKVCache):
    """``BatchKVCache`` with device buffers. Same constructor plus where the buffers live.

    Args:
        device: ORT device name (``"cuda"``; ``"cpu"`` runs the same code on the CPU provider).
        device_id: the device ordinal.
        providers: execution providers of the update graphs (the decoder session's).
    """

    def __init__(
        self,
        text: TextSection,
        max_batch: int,
        dtype: np.dtype,
        initial_capacity: int = 256,
        *,
        device: str = "cuda",
        device_id: int = 0,
        providers: Sequence[Any] = ("CUDAExecutionProvider",),
    ) -> None:
        self.device, self.device_id = device, device_id
        self.stores: dict[str, Any] = {}  # "i.key" / "i.value" -> OrtValue [max_batch, kvH, size, D]
        self._graphs = _UpdateGraphs(text, np.dtype(dtype), list(providers))
        super().__init__(text, max_batch, dtype, initial_capacity)

    # ------------------------------------------------------------------ sizes
    def _names(self) -> list[str]:
        return [f"{i}.{part}" for i in self.text.kv_layers for part in ("key", "value")]

    def _shape(self, i: int, size: int) -> tuple[int, int, int, int]:
        layer = self.text.layers[i]
        return (self.max_batch, layer.num_key_value_heads, size, layer.head_dim)

    def _grow(self, capacity: int) -> None:
        import onnxruntime as ort

        ring = min(self.window, capacity)
        if not self.stores:  # first allocation: zeros (masked slots must hold finite values)
            for name in self._names():
                i = int(name.split(".")[0])
                size = ring if i in self.sliding_layers else capacity
                zeros = np.zeros(self._shape(i, size), dtype=self.dtype)
                self.stores[name] = ort.OrtValue.ortvalue_from_numpy(zeros, self.device, self.device_id)
        else:
            pads = {  # ONNX Pad: [begin of each axis..., end of each axis...]; axis 2 grows
                "pads_full": np.array([0, 0, 0, 0, 0, 0, capacity - self.capacity, 0], dtype=np.int64),
                "pads_sliding": np.array([0, 0, 0, 0, 0, 0, ring - self.ring, 0], dtype=np.int64),
            }
            self.stores = self._graphs.run("grow", self.stores, pads, self, in_place=False)
        self.capacity, self.ring = capacity, ring

    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * self.dtype.itemsize for v in self.stores.values())

    # ------------------------------------------------------------------- rows
    def _copy_rows(self, src: np.ndarray, dst: np.ndarray) -> None:
        feeds = {"src_rows": src.astype(np.int64)[:, None], "dst_rows": dst.astype(np.int64)[:, None]}
        self._graphs.run("copy_rows", self.stores, feeds, self)

    def move_row(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self._copy_rows(np.array([src]), np.array([dst]))
        self.lengths[dst] = self.lengths[src]
        self.ring_positions[dst] = self.ring_positions[src]

    def permute_rows(self, start: int, order: Sequence[int]) -> None:
        order = np.asarray(order, dtype=np.int64)
        if np.array_equal(order, np.arange(order.size)):
            return
        src, dst = start + order, np.arange(start, start + order.size)
        self._copy_rows(src, dst)  # GatherND reads every source before ScatterND writes
        self.lengths[dst] = self.lengths[src]
        self.ring_positions[dst] = self.ring_positions[src]

    # ---------------------------------------------------------------- binding
    def feeds(self, rows: slice) -> dict[str, np.ndarray]:
        raise TypeError("a device KV cache is bound with bind_past(), not fed as numpy arrays")

    def bind_past(self, binding, rows: slice) -> None:
        start, stop = rows.start or 0, rows.stop
        for name, store in self.stores.items():
            shape = store.shape()
            row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
            binding.bind_input(
                f"past_key_values.{name}",
                self.device,
                self.device_id,
                self.dtype,
                [stop - start, *shape[1:]],
                store.data_ptr() + start * row_bytes,
            )

    def bind_presents(self, binding, n: int, seq: int) -> list[str]:
        names = [f"present.{name}" for name in self._names()]
        for name in names:  # ORT allocates them on the device (its arena: no per-step cudaMalloc)
            binding.bind_output(name, self.device, self.device_id)
        return names

    def presents(self, binding, bound: list[str]) -> dict[str, Any]:
        binding.synchronize_outputs()  # the next graph may run on another session's stream
        return dict(zip(bound, binding.get_outputs()[: len(bound)], strict=True))

    # ----------------------------------------------------------------- commit
    def commit(
        self,
        rows: slice,
        positions: np.ndarray,
        presents: dict[str, Any],
        valid: np.ndarray | None = None,
        first: np.ndarray | None = None,
    ) -> None:
        start = rows.start or 0
        n, seq = positions.shape
        counts = np.full(n, seq, dtype=np.int64) if valid is None else np.asarray(valid, dtype=np.int64)
        offsets = np.zeros(n, dtype=np.int64) if first is None else np.asarray(first, dtype=np.int64)
        if not counts.any():
            return
        lengths = self.lengths[start : start + n]
        feeds: dict[str, np.ndarray] = {}
        ring_updates = []
        for kind in ("full", "sliding"):
            if not self._graphs.heads[kind]:
                continue
            src, dst_rows, dst_slots = [], [], []
            for r in range(n):
                count = int(counts[r])
                if count == 0:
                    continue
                tokens, slots = self.step_destinations(
                    positions[r], count, int(lengths[r]), sliding=kind == "sliding", first=int(offsets[r])
                )
                if kind == "sliding":
                    ring_updates.append((start + r, slots, positions[r, tokens]))
                src.append(np.stack([np.full_like(tokens, r), tokens], axis=1))
                dst_rows.append(np.full_like(tokens, start + r))
                dst_slots.append(slots)
            feeds[f"src_{kind}"] = np.concatenate(src).astype(np.int64)
            rows_ = np.concatenate(dst_rows).astype(np.int64)
            slots_ = np.concatenate(dst_slots).astype(np.int64)
            for heads in self._graphs.heads[kind]:  # [N, H, 3] = (row, head, slot)
                h = np.arange(heads, dtype=np.int64)
                feeds[f"dst_{kind}_{heads}"] = np.stack(
                    np.broadcast_arrays(rows_[:, None], h[None, :], slots_[:, None]), axis=-1
                )
        self._graphs.run("commit", self.stores, feeds, self, extra=presents)
        for row, slots, kept in ring_updates:
            self.ring_positions[row, slots] = kept
        self.lengths[start : start + n] += counts

    # --------------------------------------------------------------- snapshots
    def snapshot(self, row: int) -> RowSnapshot:
        length = int(self.lengths[row])
        feeds = {
            "starts": np.array([row, 0, 0, 0], dtype=np.int64),
            "ends_full": np.array([row + 1, INT64_MAX, length, INT64_MAX], dtype=np.int64),
            "ends_sliding": np.array([row + 1, INT64_MAX, INT64_MAX, INT64_MAX], dtype=np.int64),
        }
        out = self._graphs.run("read_row", self.stores, feeds, self, in_place=False, to_host=True)
        full = {i: (out[f"{i}.key"][0], out[f"{i}.value"][0]) for i in self.full_layers}
        ring = {i: (out[f"{i}.key"][0], out[f"{i}.value"][0]) for i in self.sliding_layers}
        return RowSnapshot(
            length=length, full=full, ring=ring, ring_positions=self.ring_positions[row].copy()
        )

    def restore(self, row: int, snap: RowSnapshot) -> None:
        self.reserve(snap.length)
        feeds: dict[str, np.ndarray] = {"row": np.array([[row]], dtype=np.int64)}
        for i, (k, v) in {**snap.full, **snap.ring}.items():
            size = self.ring if i in self.sliding_layers else self.capacity
            for part, value in (("key", k), ("value", v)):
                padded = np.zeros((1, *self._shape(i, size)[1:]), dtype=self.dtype)
                padded[0, :, : value.shape[1]] = value
                feeds[f"update.{i}.{part}"] = padded
        self._graphs.run("write_row", self.stores, feeds, self)
        self.ring_positions[row] = snap.ring_positions
        self.lengths[row] = snap.length


class _UpdateGraphs:
    """The ONNX graphs that update a ``DeviceKVCache``'s buffers, built for its layers and dtype."""

    def __init__(self, text: TextSection, dtype: np.dtype, providers: list[Any]) -> None:
        self.text = text
        self.elem = helper.np_dtype_to_tensor_dtype(dtype)
        self.providers = providers
        self.kinds = {
            i: ("sliding" if text.layers[i].type == "sliding_attention" else "full") for i in text.kv_layers
        }
        self.heads: dict[str, list[int]] = {"full": [], "sliding": []}
        for i, kind in self.kinds.items():
            h = text.layers[i].num_key_value_heads
            if h not in self.heads[kind]:
                self.heads[kind].append(h)
        self._sessions: dict[str, Any] = {}

    def _stores(self) -> list[tuple[str, int, str]]:
        return [(f"{i}.{part}", i, self.kinds[i]) for i in self.text.kv_layers for part in ("key", "value")]

    def _build(self, name: str) -> onnx.ModelProto:
        nodes, inputs, outputs = [], [], []
        i64 = TensorProto.INT64

        def tensor(n: str, elem: int, dims: list) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(n, elem, dims)

        shared = {
            "commit": [],
            "copy_rows": [tensor("src_rows", i64, ["K", 1]), tensor("dst_rows", i64, ["K", 1])],
            "grow": [tensor("pads_full", i64, [8]), tensor("pads_sliding", i64, [8])],
            "read_row": [
                tensor("starts", i64, [4]),
                tensor("ends_full", i64, [4]),
                tensor("ends_sliding", i64, [4]),
            ],
            "write_row": [tensor("row", i64, [1, 1])],
        }[name]
        if name == "commit":
            for kind, heads in self.heads.items():
                if heads:
                    shared.append(tensor(f"src_{kind}", i64, [f"N_{kind}", 2]))
                    shared += [tensor(f"dst_{kind}_{h}", i64, [f"N_{kind}", h, 3]) for h in heads]
        inputs += shared
        for store, i, kind in self._stores():
            layer = self.text.layers[i]
            dims = ["B", layer.num_key_value_heads, f"C_{kind}", layer.head_dim]
            inputs.append(tensor(f"store.{store}", self.elem, dims))
            out = f"out.{store}"
            if name == "commit":
                inputs.append(tensor(f"present.{store}", self.elem, ["n", dims[1], "S", dims[3]]))
                nodes += [
                    helper.make_node("Transpose", [f"present.{store}"], [f"t.{store}"], perm=[0, 2, 1, 3]),
                    helper.make_node("GatherND", [f"t.{store}", f"src_{kind}"], [f"u.{store}"]),
                    helper.make_node(
                        "ScatterND",
                        [f"store.{store}", f"dst_{kind}_{dims[1]}", f"u.{store}"],
                        [out],
                    ),
                ]
            elif name == "copy_rows":
                nodes += [
                    helper.make_node("GatherND", [f"store.{store}", "src_rows"], [f"g.{store}"]),
                    helper.make_node("ScatterND", [f"store.{store}", "dst_rows", f"g.{store}"], [out]),
                ]
            elif name == "grow":
                nodes.append(helper.make_node("Pad", [f"store.{store}", f"pads_{kind}"], [out]))
            elif name == "read_row":
                nodes.append(helper.make_node("Slice", [f"store.{store}", "starts", f"ends_{kind}"], [out]))
            else:  # write_row
                inputs.append(tensor(f"update.{store}", self.elem, [1, *dims[1:]]))
                nodes.append(
                    helper.make_node("ScatterND", [f"store.{store}", "row", f"update.{store}"], [out])
                )
            outputs.append(tensor(out, self.elem, [f"{out}.{axis}" for axis in range(4)]))
        graph = helper.make_graph(nodes, f"kv_{name}", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    def session(self, name: str) -> Any:
        sess = self._sessions.get(name)
        if sess is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            sess = self._sessions[name] = ort.InferenceSession(
                self._build(name).SerializeToString(), sess_options=options, providers=self.providers
            )
        return sess

    def run(
        self,
        name: str,
        stores: dict[str, Any],
        feeds: dict[str, np.ndarray],
        cache: DeviceKVCache,
        *,
        extra: dict[str, Any] | None = None,
        in_place: bool = True,
        to_host: bool = False,
    ) -> dict[str, Any]:
        """Run graph ``name`` on ``stores``. ``in_place``: each output is written into its input's
        buffer; otherwise ORT allocates the outputs (on the host with ``to_host``: numpy arrays)."""
        sess = self.session(name)
        binding = sess.io_binding()
        for key, value in feeds.items():
            binding.bind_cpu_input(key, np.ascontiguousarray(value))
        for key, value in (extra or {}).items():  # present.* OrtValues from the decoder run
            binding.bind_ortvalue_input(key, value)
        for key, store in stores.items():
            binding.bind_ortvalue_input(f"store.{key}", store)
            if in_place:
                binding.bind_ortvalue_output(f"out.{key}", store)
            else:
                binding.bind_output(f"out.{key}", "cpu" if to_host else cache.device, cache.device_id)
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the decoder's session reads these buffers next
        if in_place:
            return stores
        values = binding.get_outputs()
        if to_host:
            return {key: np.array(value.numpy()) for key, value in zip(stores, values, strict=True)}
        return dict(zip(stores, values, strict=True))
