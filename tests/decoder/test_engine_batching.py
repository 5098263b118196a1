"""The engine's batched prefill and its KV storage (host numpy or device OrtValues).

Real ONNX Runtime sessions on the tiny bundle, no server: requests are queued together so that
they are admitted together, and every output is compared with its solo run. ``kv_storage="device"``
runs the device-resident cache's code (OrtValues updated in place by ONNX graphs) on the CPU
provider; on a GPU the same code runs with ``device="cuda"``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest
from gemma_mesh.decoder.kv_cache import EMPTY, BatchKVCache
from gemma_mesh.decoder.prefix_cache import snapshot_lengths
from gemma_mesh.decoder.settings import DecoderSettings

WORDS = "the lighthouse keeper found a bottle on the shore and read the letter inside twice".split()


STORAGES = pytest.mark.parametrize("storage", ["host", "device"])


def _engine(bundle, storage: str = "host", **overrides) -> Engine:
    settings = DecoderSettings(
        providers=["CPUExecutionProvider"], kv_storage=storage, **{"max_batch_size": 8, **overrides}
    )
    engine = Engine(bundle, settings)
    assert type(engine.kv).__name__ == {"host": "BatchKVCache", "device": "DeviceKVCache"}[storage]
    return engine


def _prompt(bundle, words: int, salt: int) -> np.ndarray:
    text = " ".join(WORDS[(salt + i) % len(WORDS)] for i in range(words))
    return bundle.prompt_builder.build([{"role": "user", "content": text}]).input_ids


def _submit_together(engine: Engine, requests: list[GenerationRequest]) -> list:
    """Queue every request at once (holding the engine's lock), so they are admitted together."""
    with engine._cond:
        return [engine.submit(r) for r in requests]


def _collect(handles) -> tuple[list[list[int]], list[Finished]]:
    ids, finished = [], []
    for handle in handles:
        tokens: list[int] = []
        for event in handle.iter_events(timeout_s=120):
            if isinstance(event, Finished):
                finished.append(event)
            else:
                tokens += event.token_ids
        ids.append(tokens)
    return ids, finished


def _run(engine: Engine, requests: list[GenerationRequest]) -> tuple[list[list[int]], list[Finished]]:
    """Start the engine, run ``requests`` together, stop it."""
    engine.start()
    try:
        return _collect(_submit_together(engine, requests))
    finally:
        engine.stop()


def _spy_runs(engine: Engine) -> list[tuple[int, int]]:
    """Record the ``[rows, tokens]`` shape of every decoder run (the real run still happens)."""
    shapes: list[tuple[int, int]] = []
    real = engine._run_step

    def spy(rows, embeds, per_layer, positions, valid=None):
        shapes.append(positions.shape)
        return real(rows, embeds, per_layer, positions, valid)

    engine._run_step = spy
    return shapes


@STORAGES
@pytest.mark.parametrize("chunk", [256, 24])
def test_prompts_of_different_lengths_prefilled_together_equal_their_solo_runs(tiny_bundle, chunk, storage):
    # 5 ... 40 words: with a 24-token budget the long ones need several chunks while the short
    # ones finish and decode; max_tokens 1 retires a row at its first token, inside the prefill.
    lengths, max_tokens = [5, 40, 12, 3, 25, 8], [6, 9, 1, 7, 5, 8]
    requests = [
        GenerationRequest(f"r{i}", _prompt(tiny_bundle, n, i), max_tokens=m, ignore_eos=True)
        for i, (n, m) in enumerate(zip(lengths, max_tokens, strict=True))
    ]
    solo = [_run(_engine(tiny_bundle, prefix_cache_bytes=0), [r])[0][0] for r in requests]
    engine = _engine(
        tiny_bundle, storage, prefill_chunk_tokens=chunk, prefix_cache_bytes=0, kv_initial_tokens=16
    )
    shapes = _spy_runs(engine)
    together, finished = _run(engine, requests)
    assert together == solo
    assert [len(t) for t in together] == max_tokens
    assert [f.prompt_tokens for f in finished] == [len(r.input_ids) for r in requests]
    prefill_runs = [s for s in shapes if s[1] > 1]
    assert prefill_runs[0][0] == len(requests)  # the first run prefilled every prompt at once
    assert all(rows * tokens <= max(chunk, rows) for rows, tokens in prefill_runs)  # the budget holds
    assert len({tuple(t) for t in solo}) > 1


@STORAGES
def test_prefix_cache_hits_inside_a_batched_prefill(tiny_bundle, storage):
    """Two rounds of the same prompts: the second restores cached prefixes of different lengths per
    row and prefills only the rest, still equal to the first round's output."""
    requests = [
        GenerationRequest(f"r{i}", _prompt(tiny_bundle, n, 0), max_tokens=5, ignore_eos=True)
        for i, n in enumerate([30, 18, 44])
    ]
    engine = _engine(tiny_bundle, storage, prefill_chunk_tokens=256, prefix_block_tokens=8)
    engine.start()
    try:
        first, cold = _collect(_submit_together(engine, requests))
        again, warm = _collect(_submit_together(engine, requests))
    finally:
        engine.stop()
    assert again == first
    assert [f.cached_prompt_tokens for f in cold] == [0, 0, 0]
    assert all(f.cached_prompt_tokens >= 8 for f in warm)
    assert len({f.cached_prompt_tokens for f in warm}) > 1  # rows restore prefixes of different lengths


@STORAGES
def test_a_request_cancelled_while_prefilling_leaves_the_others_exact(tiny_bundle, storage):
    requests = [
        GenerationRequest(f"r{i}", _prompt(tiny_bundle, n, i), max_tokens=6, ignore_eos=True)
        for i, n in enumerate([20, 40, 10])
    ]
    solo = [_run(_engine(tiny_bundle), [r])[0][0] for r in (requests[0], requests[2])]
    engine = _engine(tiny_bundle, storage, prefill_chunk_tokens=12)
    engine.start()
    try:
        handles = _submit_together(engine, requests)
        deadline = time.monotonic() + 60  # 12 tokens per run over 3 rows: 40 words take many runs
        while not any(seq.handle is handles[1] for seq in engine._prefilling):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        handles[1].cancel()  # while it prefills; dropped at the next step boundary
        outputs, _ = _collect([handles[0], handles[2]])
    finally:
        engine.stop()
    assert outputs == solo
    assert not engine._prefilling and not engine._decoding


def test_commit_stores_only_the_valid_tokens_of_each_row(tiny_bundle):
    """A padded two-row commit equals committing each row's real tokens alone."""
    text = tiny_bundle.manifest.text
    rng = np.random.default_rng(0)
    window = text.sliding_window
    seq, valid = window + 3, np.array([window + 3, 2])
    presents = {}
    for i in text.kv_layers:
        shape = (2, text.layers[i].num_key_value_heads, seq, text.layers[i].head_dim)
        presents[f"present.{i}.key"] = rng.standard_normal(shape).astype(np.float32)
        presents[f"present.{i}.value"] = rng.standard_normal(shape).astype(np.float32)
    positions = np.arange(seq)[None].repeat(2, 0)
    batched = BatchKVCache(text, 2, np.float32, 64)
    batched.commit(slice(0, 2), positions, presents, valid)
    for r in range(2):
        alone = BatchKVCache(text, 1, np.float32, 64)
        n = int(valid[r])
        alone.commit(
            slice(0, 1), positions[r : r + 1, :n], {k: v[r : r + 1, :, :n] for k, v in presents.items()}
        )
        assert batched.lengths[r] == alone.lengths[0] == n
        np.testing.assert_array_equal(batched.ring_positions[r], alone.ring_positions[0])
        for i in text.kv_layers:
            np.testing.assert_array_equal(batched.keys[i][r], alone.keys[i][0])
            np.testing.assert_array_equal(batched.values[i][r], alone.values[i][0])


def _assert_device_matches_host(device, host: BatchKVCache) -> None:
    """The device cache holds exactly the host cache's state: lengths, ring positions, and every
    slot a mask can expose (full layers below each row's length, ring slots in use; a restore
    leaves stale keys past the snapshot on the host and zeros on the device)."""
    assert device.capacity == host.capacity and device.ring == host.ring
    np.testing.assert_array_equal(device.lengths, host.lengths)
    np.testing.assert_array_equal(device.ring_positions, host.ring_positions)
    for i in host.text.kv_layers:
        for part, store in (("key", host.keys), ("value", host.values)):
            actual = device.stores[f"{i}.{part}"].numpy()
            for row in range(host.lengths.shape[0]):
                if i in host.sliding_layers:
                    used = np.flatnonzero(host.ring_positions[row, : host.ring] != EMPTY)
                else:
                    used = np.arange(host.lengths[row])
                assert used.size > 0 or host.lengths[row] == 0
                np.testing.assert_array_equal(actual[row][:, used], store[i][row][:, used])


def test_device_cache_operations_equal_the_host_cache(tiny_bundle):
    """Commit (decode and padded prefill, past the window), growth, row moves, permutations,
    snapshot and restore on the device cache leave exactly the host cache's contents."""
    from gemma_mesh.decoder.device_kv import DeviceKVCache

    text = tiny_bundle.manifest.text
    rng = np.random.default_rng(1)
    host = BatchKVCache(text, 4, np.float32, 8)
    device = DeviceKVCache(text, 4, np.float32, 8, device="cpu", providers=["CPUExecutionProvider"])

    def step(rows: slice, seq: int, valid=None) -> None:
        n = rows.stop - rows.start
        positions = host.lengths[rows, None] + np.arange(seq)[None]
        presents = {}
        for i in text.kv_layers:
            shape = (n, text.layers[i].num_key_value_heads, seq, text.layers[i].head_dim)
            for part in ("key", "value"):
                presents[f"present.{i}.{part}"] = rng.standard_normal(shape).astype(np.float32)
        need = int(host.lengths[rows].max()) + seq
        host.reserve(need)
        device.reserve(need)
        host.commit(rows, positions, presents, valid)
        import onnxruntime as ort

        on_device = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in presents.items()}
        device.commit(rows, positions, on_device, valid)

    def assert_same() -> None:
        _assert_device_matches_host(device, host)

    step(slice(0, 3), 40, np.array([40, 5, 17]))  # padded prefill past the window; grows 8 -> 64
    step(slice(0, 3), 1)  # a decode step
    assert_same()
    for cache in (host, device):
        cache.permute_rows(0, [2, 0, 1])
        cache.move_row(2, 3)
    assert_same()
    snap_host, snap_device = host.snapshot(0), device.snapshot(0)
    assert snap_device.length == snap_host.length
    for i in text.kv_layers:
        layers = snap_host.full if i in snap_host.full else snap_host.ring
        other = snap_device.full if i in snap_device.full else snap_device.ring
        np.testing.assert_array_equal(other[i][0], layers[i][0])
    step(slice(0, 4), 30)  # more growth (64 -> 128), then restore the old row 0 into row 1
    for cache, snap in ((host, snap_host), (device, snap_device)):
        cache.reset_row(1)
        cache.restore(1, snap)
    assert_same()
    assert device.nbytes() == host.nbytes()


def _presents(text, rng, n: int, seq: int) -> dict[str, np.ndarray]:
    presents = {}
    for i in text.kv_layers:
        shape = (n, text.layers[i].num_key_value_heads, seq, text.layers[i].head_dim)
        for part in ("key", "value"):
            presents[f"present.{i}.{part}"] = rng.standard_normal(shape).astype(np.float32)
    return presents


def _assert_rows_equal(a: BatchKVCache, row_a: int, b: BatchKVCache, row_b: int) -> None:
    assert a.lengths[row_a] == b.lengths[row_b]
    np.testing.assert_array_equal(a.ring_positions[row_a], b.ring_positions[row_b])
    for i in a.text.kv_layers:
        if i in a.sliding_layers:
            used = np.flatnonzero(a.ring_positions[row_a, : a.ring] != EMPTY)
        else:
            used = np.arange(a.lengths[row_a])
        for store_a, store_b in ((a.keys, b.keys), (a.values, b.values)):
            np.testing.assert_array_equal(store_a[i][row_a][:, used], store_b[i][row_b][:, used])


@pytest.mark.parametrize("cuts", [[3], [1, 2 + 1], [5, 9]])
def test_a_step_committed_in_pieces_equals_the_prefix_committed_alone(tiny_bundle, cuts):
    """The prefix cache snapshots a row in the middle of a prefill run: committing the run's tokens
    in pieces (``first``), the state after each piece equals a cache that only ever saw that prefix,
    and the last piece leaves the state of one whole commit. Past the sliding window too: the ring
    after a piece still holds the window before it, not keys the rest of the run overwrote."""
    text = tiny_bundle.manifest.text
    window = text.sliding_window
    rng = np.random.default_rng(2)
    seq = window + 9
    valid = np.array([seq, seq - 2])
    points = [window + c for c in cuts]  # cuts inside the run, past the window
    presents = _presents(text, rng, 2, seq)
    positions = np.arange(seq)[None].repeat(2, 0)
    whole = BatchKVCache(text, 2, np.float32, 8)
    whole.reserve(seq)
    whole.commit(slice(0, 2), positions, presents, valid)
    pieces = BatchKVCache(text, 2, np.float32, 8)
    pieces.reserve(seq)
    done = np.zeros(2, dtype=np.int64)
    for point in [*points, seq]:
        cut = np.minimum(point, valid)
        pieces.commit(slice(0, 2), positions, presents, cut - done, first=done)
        for r in range(2):
            alone = BatchKVCache(text, 1, np.float32, 8)
            alone.reserve(seq)
            n = int(cut[r])
            alone.commit(
                slice(0, 1), positions[r : r + 1, :n], {k: v[r : r + 1, :, :n] for k, v in presents.items()}
            )
            _assert_rows_equal(pieces, r, alone, 0)
            snap = pieces.snapshot(r)
            assert snap.length == n
        done = cut
    for r in range(2):
        _assert_rows_equal(pieces, r, whole, r)


def test_device_cache_commits_in_pieces_like_the_host_cache(tiny_bundle):
    import onnxruntime as ort

    from gemma_mesh.decoder.device_kv import DeviceKVCache

    text = tiny_bundle.manifest.text
    seq = text.sliding_window + 6
    presents = _presents(text, np.random.default_rng(3), 2, seq)
    positions = np.arange(seq)[None].repeat(2, 0)
    host = BatchKVCache(text, 2, np.float32, 8)
    device = DeviceKVCache(text, 2, np.float32, 8, device="cpu", providers=["CPUExecutionProvider"])
    on_device = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in presents.items()}
    for cache in (host, device):
        cache.reserve(seq)
    for counts, first in (([4, 0], [0, 0]), ([seq - 4, 7], [4, 0]), ([0, seq - 8], [seq, 7])):
        host.commit(slice(0, 2), positions, presents, np.array(counts), first=np.array(first))
        device.commit(slice(0, 2), positions, on_device, np.array(counts), first=np.array(first))
    _assert_device_matches_host(device, host)


@STORAGES
def test_a_prompt_is_prefilled_in_one_run_through_its_snapshot_lengths(tiny_bundle, storage):
    """A multi-turn prompt within the chunk budget takes one prefill run, however many snapshot
    lengths (turn starts, block boundaries) it passes; every one of them is stored, and a later prompt
    that shares a prefix up to one restores it and gives its solo output."""
    builder = tiny_bundle.prompt_builder
    turns = [{"role": "user", "content": " ".join(WORDS[:9])}, {"role": "assistant", "content": "yes"}]
    first = GenerationRequest(
        "a",
        builder.build([*turns, {"role": "user", "content": "and then"}]).input_ids,
        max_tokens=4,
        ignore_eos=True,
    )
    second = GenerationRequest(
        "b",
        builder.build([*turns, {"role": "user", "content": "why twice"}]).input_ids,
        max_tokens=4,
        ignore_eos=True,
    )
    solo = _run(_engine(tiny_bundle, storage, prefix_cache_bytes=0), [second])[0][0]
    engine = _engine(tiny_bundle, storage, prefill_chunk_tokens=256, prefix_block_tokens=8)
    shapes = _spy_runs(engine)
    engine.start()
    try:
        _collect(_submit_together(engine, [first]))
        runs_first = [s for s in shapes if s[1] > 1]
        lengths = sorted(snap.length for snap in engine.prefix_cache._entries.values())
        out, finished = _collect(_submit_together(engine, [second]))
    finally:
        engine.stop()
    assert runs_first == [(1, len(first.input_ids))]  # the whole prompt in one run
    starts = np.flatnonzero(first.input_ids == engine.turn_start_id).tolist()
    assert lengths == snapshot_lengths(len(first.input_ids), starts, 8) and len(lengths) >= 3
    assert out[0] == solo
    common = int(
        np.argmax(first.input_ids[: len(second.input_ids)] != second.input_ids[: len(first.input_ids)])
    )
    assert starts[-2] < common < starts[-1]  # they share the last user turn's start, not its text
    assert finished[0].cached_prompt_tokens == max(n for n in lengths if n <= common)
