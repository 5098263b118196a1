#!/usr/bin/env python3
"""Where a decode step's time goes: ONNX Runtime's profiler on the bundle's decoder graph.

Runs the decoder session alone (the engine's session options, plus ``enable_profiling``) on
synthetic inputs of the engine's shapes: ``--batch`` rows, one new token each (``--step 1``, a
decode step) or ``--step`` tokens (a prefill chunk), over ``--past`` cached tokens. Prints the share
of node time per operator type (and the slowest nodes), the session's mean wall time per run, and
that time against the step time the engine reaches on the same shapes (the rest is the engine's
host work per step: embedding lookup, masks, sampling, streaming). Last line: one JSON object.

    python bench/decoder_profile.py --bundle runs/bench/small-bundle --past 512
    python bench/decoder_profile.py --bundle runs/bench/small-bundle-int4 --batch 16
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from gemma_mesh.model.bundle import ModelBundle


def feeds_for(bundle: ModelBundle, batch: int, step: int, past: int) -> dict[str, np.ndarray]:
    """Random inputs of the engine's shapes: ``batch`` rows of ``step`` new tokens over ``past`` cached ones."""
    text = bundle.manifest.text
    graph = bundle.manifest.graphs["decoder_model_merged"]
    rng = np.random.default_rng(0)
    window = text.sliding_window
    sliding_past = min(past, window)
    feeds: dict[str, np.ndarray] = {
        "inputs_embeds": rng.standard_normal((batch, step, text.hidden_size), dtype=np.float32),
        "per_layer_inputs": rng.standard_normal(
            (batch, step, text.num_hidden_layers, text.hidden_size_per_layer_input), dtype=np.float32
        ),
        "attention_mask": np.ones((batch, 1, step, past + step), dtype=bool),
        "sliding_attention_mask": np.ones((batch, 1, step, sliding_past + step), dtype=bool),
        "position_ids": np.tile(np.arange(past, past + step, dtype=np.int64), (batch, 1)),
        "logits_indices": np.full((batch, 1), step - 1, dtype=np.int64),
    }
    for i in text.kv_layers:
        layer = text.layers[i]
        length = sliding_past if layer.type == "sliding_attention" else past
        shape = (batch, layer.num_key_value_heads, length, layer.head_dim)
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = rng.standard_normal(shape, dtype=np.float32)
    dtype = bundle.float_dtype
    names = {spec.name for spec in graph.inputs}
    return {k: (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in feeds.items() if k in names}


def profile(
    bundle_dir: Path, *, batch: int, step: int, past: int, runs: int, threads: int, spin: bool
) -> dict:
    """Profile ``runs`` decoder runs; returns per-op-type shares, top nodes and mean wall ms per run."""
    import onnxruntime as ort

    bundle = ModelBundle(bundle_dir, providers=["CPUExecutionProvider"])
    feeds = feeds_for(bundle, batch, step, past)
    entry = bundle.manifest.graphs["decoder_model_merged"]

    def session(profiling: bool, prefix: str = "") -> ort.InferenceSession:
        options = ort.SessionOptions()  # as ModelBundle.session builds it
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profiling:
            options.enable_profiling = True
            options.profile_file_prefix = prefix
        return ort.InferenceSession(
            str(bundle_dir / entry.file), sess_options=options, providers=bundle.providers
        )

    plain = session(False)
    for _ in range(3):
        plain.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(runs):
        plain.run(None, feeds)
    wall_ms = (time.perf_counter() - t0) / runs * 1000
    del plain

    with tempfile.TemporaryDirectory() as tmp:
        prof = session(True, os.path.join(tmp, "decoder"))
        for _ in range(3 + runs):
            prof.run(None, feeds)
        events = json.loads(Path(prof.end_profiling()).read_text())
    by_type: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            by_type[op] += event["dur"]
            by_node[f"{op} {event['name'].removesuffix('_kernel_time')}"] += event["dur"]
    total = sum(by_type.values()) or 1.0
    return {
        "batch": batch,
        "step": step,
        "past": past,
        "threads": threads,
        "session_ms_per_run": round(wall_ms, 3),
        "op_share": {k: round(v / total, 3) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
        "top_nodes_ms": {
            k: round(v / (3 + runs) / 1000, 3) for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:12]
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--step", type=int, default=1, help="new tokens per row (1: a decode step)")
    parser.add_argument("--past", type=int, default=512, help="cached tokens per row")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--allow-spinning", action="store_true")
    args = parser.parse_args()
    result = profile(
        args.bundle,
        batch=args.batch,
        step=args.step,
        past=args.past,
        runs=args.runs,
        threads=args.threads,
        spin=args.allow_spinning,
    )
    for op, share in result["op_share"].items():
        print(f"{op:<32} {share:6.1%}", file=sys.stderr)
    for node, ms in result["top_nodes_ms"].items():
        print(f"{ms:8.3f} ms  {node}", file=sys.stderr)
    print(f"session: {result['session_ms_per_run']} ms per run", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
