#!/usr/bin/env python3
"""gemma-mesh's CPU decoder against llama.cpp on the same checkpoint, same prompt, greedy, same run.

For each model size (default: the ~100M-parameter "small" random Gemma 4; "tiny" too on request),
the make-tiny checkpoint is exported twice (fp32; fp32 with int4 ``MatMulNBits`` decoder weights) and
converted with llama.cpp's own converter (f32 GGUF, then ``llama-quantize`` to Q4_0: both 4-bit
formats are symmetric with one scale per 32 weights). Then, pair by pair (fp32 vs f32, int4 vs Q4_0):

- TTFT of a ``--prompt-tokens`` prompt (512): ours is the engine's first-token latency for one
  request; llama.cpp's is ``--prompt-tokens`` over ``llama-bench``'s pp rate;
- single-stream decode tokens/s at that depth: the engine's ``decode_tokens_per_s`` for
  ``--gen-tokens`` new tokens (128) against ``llama-bench -p 0 -n 128 -d 512``;
- aggregate decode tokens/s with 4 and 16 concurrent streams, each with its own 512-token prompt:
  ours counts the tokens all streams emit while every one of them is decoding (in process, the
  engine's continuous batching); llama.cpp's is ``llama-batched-bench``'s S_TG (all sequences in one
  batch per step);
- greedy tokens: ``--greedy-prompts`` prompts (the 512-token prompt's prefixes of 64, 128, ...
  tokens, so each continuation starts from another context) through both as the same ids,
  ``--greedy-tokens`` new tokens each: how many continuations are identical and the shortest common
  prefix (a random model soon repeats one token, hence many short contexts rather than one long
  continuation); for a 4-bit pair, how many each side shares with its own full-precision run; and
  llama.cpp's tokenization of the prompt text against the checkpoint's tokenizer.

Best of ``--reps`` for single-stream figures on both sides (llama-bench's samples, our runs). Both
use ``--threads`` threads (default: all cores); llama.cpp's threads busy-wait at its default
``--llama-poll 50``, ours only with ``--allow-spinning``. llama.cpp is fetched and built by ``bench/llamacpp.py``
under ``--cache-dir``; checkpoints and bundles go under ``--work-dir`` (shared with bench/decoder.py).
Prints a table, then one JSON line (ratios are ours over llama.cpp's, except TTFT: ours over theirs,
lower is better).

    python bench/peers.py                       # small: 6-20 minutes on 2 cores once built
    python bench/peers.py --sizes tiny --reps 1 # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "services"))

import llamacpp  # noqa: E402
from decoder import ensure_bundle, log, report  # noqa: E402

from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest  # noqa: E402
from gemma_mesh.decoder.settings import DecoderSettings  # noqa: E402
from gemma_mesh.model.bundle import ModelBundle  # noqa: E402

TEXT = (
    "The keeper climbed the spiral stairs at dusk, trimmed the wick, wound the clockwork and wrote "
    "the weather in the log: wind from the west, a long swell, two ships passing north before dark. "
)


def ensure_int4_bundle(work: Path, size: str, checkpoint: Path) -> Path:
    """The fp32 export with int4 ``MatMulNBits`` decoder weights (``export --weights int4``)."""
    from gemma_mesh.model.export.exporter import export_bundle

    out = work / f"{size}-bundle-int4"
    if not (out / "manifest.json").exists():
        log(f"[{size}] export (fp32, int4 decoder weights)")
        export_bundle(checkpoint, out, dtype="float32", weights="int4", progress=sys.stderr.isatty())
    return out


def long_prompt(bundle: ModelBundle, tokens: int) -> np.ndarray:
    """The first ``tokens`` ids of a templated user turn (bos, turn start, ``TEXT`` repeated).

    Raises:
        ValueError: the tokenizer cannot reach ``tokens`` within 64 repeats.
    """
    for repeats in range(1, 65):
        ids = bundle.prompt_builder.build([{"role": "user", "content": TEXT * repeats}]).input_ids
        if len(ids) >= tokens:
            return np.asarray(ids[:tokens], dtype=np.int64)
    raise ValueError(f"could not build a {tokens}-token prompt")


def _engine(bundle: ModelBundle, batch: int, **overrides) -> Engine:
    settings = DecoderSettings(
        max_batch_size=batch,
        max_queue_size=batch,
        prefix_cache_bytes=0,  # each request prefills its whole prompt
        providers=["CPUExecutionProvider"],
        **overrides,
    )
    engine = Engine(bundle, settings)
    engine.start()
    return engine


def ours_single(bundle: ModelBundle, prompt: np.ndarray, gen: int, reps: int, **overrides) -> dict:
    """One request at a time: best TTFT and best decode tokens/s. Returns ``{"ttft_ms", "decode_tokens_per_s"}``."""
    engine = _engine(bundle, 1, **overrides)
    try:
        runs = []
        for i in range(reps + 1):  # the first run warms the session up
            handle = engine.submit(GenerationRequest(f"single-{i}", prompt, max_tokens=gen, ignore_eos=True))
            runs.append(next(e for e in handle.iter_events(timeout_s=1800) if isinstance(e, Finished)))
    finally:
        engine.stop()
    return {
        "ttft_ms": min(f.ttft_s for f in runs[1:]) * 1000,
        "decode_tokens_per_s": max(f.decode_tokens_per_s for f in runs[1:]),
    }


def ours_greedy(bundle: ModelBundle, prompts: list[np.ndarray], gen: int, **overrides) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (batched: the engine's rows are independent)."""
    engine = _engine(bundle, len(prompts), **overrides)
    try:
        handles = [
            engine.submit(GenerationRequest(f"greedy-{i}", p, max_tokens=gen, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        return [
            [t for e in h.iter_events(timeout_s=1800) if not isinstance(e, Finished) for t in e.token_ids]
            for h in handles
        ]
    finally:
        engine.stop()


def ours_aggregate(bundle: ModelBundle, prompt: np.ndarray, gen: int, streams: int, **overrides) -> float:
    """Decode tokens/s summed over ``streams`` concurrent requests while all of them decode.

    The window opens when the last stream emits its first token (every prompt is prefilled) and
    closes when the first stream emits its last; tokens emitted inside it over its length.

    Raises:
        RuntimeError: the window is empty (streams never all decoded at once).
    """
    engine = _engine(bundle, streams, **overrides)
    try:
        warm = engine.submit(GenerationRequest("warm", prompt[:32], max_tokens=4, ignore_eos=True))
        list(warm.iter_events(timeout_s=600))
        stamps: list[list[tuple[float, int]]] = [[] for _ in range(streams)]

        def consume(i: int, handle) -> None:
            for event in handle.iter_events(timeout_s=3600):
                if not isinstance(event, Finished) and event.token_ids:
                    stamps[i].append((time.perf_counter(), len(event.token_ids)))

        with engine._cond:  # admitted together, as llama-batched-bench starts its sequences
            handles = [
                engine.submit(GenerationRequest(f"agg-{i}", prompt, max_tokens=gen, ignore_eos=True))
                for i in range(streams)
            ]
        readers = [threading.Thread(target=consume, args=(i, h), daemon=True) for i, h in enumerate(handles)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=3600)
    finally:
        engine.stop()
    start = max(s[0][0] for s in stamps)
    end = min(s[-1][0] for s in stamps)
    if end <= start:
        raise RuntimeError(f"{streams} streams never decoded together (raise --gen-tokens)")
    inside = sum(n for s in stamps for t, n in s if start < t <= end)
    return inside / (end - start)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare_pair(
    peer: llamacpp.LlamaCpp,
    bundle: ModelBundle,
    gguf: Path,
    args: argparse.Namespace,
    prompt: np.ndarray,
    reference: dict[str, list[int]] | None = None,
    **overrides,
) -> tuple[dict[str, float | int], dict[str, list[int]]]:
    """Every figure of one precision pair (ours ``bundle`` against llama.cpp's ``gguf``).

    ``reference``: both sides' greedy tokens at full precision (``{"ours": [[...]], "theirs": [[...]]}``),
    for a 4-bit pair. Returns the figures and this pair's greedy tokens in that form.
    """
    t, p, g = args.threads, args.prompt_tokens, args.gen_tokens
    out: dict[str, float | int] = {}
    log(f"  llama.cpp: llama-bench pp{p}, tg{g}@d{p}")
    poll = args.llama_poll
    pp = peer.bench(gguf, threads=t, prompt=p, gen=0, depth=0, reps=args.reps, poll=poll)
    tg = peer.bench(gguf, threads=t, prompt=0, gen=g, depth=p, reps=args.reps, poll=poll)
    out["llamacpp_ttft_ms"] = p / max(pp["samples_ts"]) * 1000
    out["llamacpp_decode_tokens_per_s"] = max(tg["samples_ts"])
    out["llamacpp_flash_attn"] = str(tg.get("flash_attn"))
    log(f"  llama.cpp: llama-batched-bench npl {args.concurrency}")
    batched = peer.batched_bench(gguf, threads=t, prompt=p, gen=g, parallel=args.concurrency, poll=poll)
    for c in args.concurrency:
        out[f"llamacpp_aggregate_tokens_per_s_at_{c}"] = batched[c]["speed_tg"]
    step = len(prompt) // args.greedy_prompts
    prompts = [prompt[: step * (i + 1)] for i in range(args.greedy_prompts)]
    log(f"  llama.cpp: greedy tokens of {len(prompts)} prompts (bindings)")
    theirs = peer.greedy(
        gguf, [[int(i) for i in q] for q in prompts], args.greedy_tokens, threads=t, text=TEXT
    )
    log("  gemma-mesh: single stream")
    ours = ours_single(bundle, prompt, g, args.reps, **overrides)
    log(f"  gemma-mesh: greedy tokens of {len(prompts)} prompts")
    mine = ours_greedy(bundle, prompts, args.greedy_tokens, **overrides)
    out["ttft_ms"] = ours["ttft_ms"]
    out["decode_tokens_per_s"] = ours["decode_tokens_per_s"]
    for c in args.concurrency:
        log(f"  gemma-mesh: {c} concurrent streams")
        out[f"aggregate_tokens_per_s_at_{c}"] = ours_aggregate(bundle, prompt, g, c, **overrides)
    out["greedy_prompts"] = len(prompts)
    out["greedy_prompts_identical"] = sum(a == b for a, b in zip(mine, theirs["tokens"], strict=True))
    out["greedy_shortest_common_prefix"] = min(map(common_prefix, mine, theirs["tokens"]))
    out["greedy_distinct_first_tokens"] = len({run[0] for run in mine})
    if reference is not None:  # a 4-bit pair: how many continuations each side shares with its own f32 run
        out["greedy_prompts_identical_to_own_f32"] = sum(
            a == b for a, b in zip(mine, reference["ours"], strict=True)
        )
        out["llamacpp_greedy_prompts_identical_to_own_f32"] = sum(
            a == b for a, b in zip(theirs["tokens"], reference["theirs"], strict=True)
        )
    greedy = {"ours": mine, "theirs": theirs["tokens"]}
    ids = bundle.tokenizer.encode(TEXT, add_special_tokens=False).ids
    out["tokenizer_matches"] = int(list(ids) == list(theirs["text_ids"]))
    out["decode_vs_llamacpp"] = out["decode_tokens_per_s"] / out["llamacpp_decode_tokens_per_s"]
    out["ttft_vs_llamacpp"] = out["ttft_ms"] / out["llamacpp_ttft_ms"]
    for c in args.concurrency:
        key = f"aggregate_tokens_per_s_at_{c}"
        out[f"aggregate{c}_vs_llamacpp"] = out[key] / out["llamacpp_" + key]
    return out, greedy


def _settings_overrides(spec: str) -> dict[str, str]:
    """``KEY=VALUE,...`` -> DecoderSettings keyword arguments (e.g. ``prefill_chunk_tokens=512``)."""
    return dict(item.split("=", 1) for item in spec.split(",") if item)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="small", help="make-tiny presets, comma-separated")
    parser.add_argument("--precisions", default="f32,int4", help="f32 (fp32 vs f32) and/or int4 (vs Q4_0)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="4,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--greedy-prompts", type=int, default=8)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work-dir", type=Path, default=HERE.parent / "runs" / "bench")
    parser.add_argument("--cache-dir", type=Path, default=llamacpp.DEFAULT_CACHE)
    parser.add_argument("--llama-cpp-version", default=llamacpp.DEFAULT_VERSION)
    parser.add_argument(
        "--allow-spinning", action="store_true", help="ONNX Runtime's idle threads busy-wait (as ggml's do)"
    )
    parser.add_argument(
        "--llama-poll",
        type=int,
        default=50,
        help="llama.cpp's --poll: how much its idle threads busy-wait (0: not at all; 50: its default)",
    )
    parser.add_argument(
        "--engine-settings",
        default="",
        help="DecoderSettings overrides for our side, KEY=VALUE,... (e.g. prefill_chunk_tokens=512)",
    )
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    overrides = _settings_overrides(args.engine_settings)
    peer = llamacpp.ensure(args.cache_dir, args.llama_cpp_version, log=log)
    import onnxruntime

    figures: dict[str, float | int | str] = {
        "llama_cpp": f"llama-cpp-python {peer.version} sdist, {peer.commit()}",
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "allow_spinning": args.allow_spinning,
        "llama_poll": args.llama_poll,
        "engine_settings": args.engine_settings,
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    sizes = args.sizes.split(",")
    for size in sizes:
        checkpoint, bundle_dir = ensure_bundle(args.work_dir, size)
        gguf_dir = args.cache_dir / "gguf"
        f32 = peer.convert(checkpoint, gguf_dir / f"{size}-seed0-f32.gguf")
        pairs = {}
        if "f32" in args.precisions:
            pairs["f32"] = (bundle_dir, f32)
        if "int4" in args.precisions:
            q4 = peer.quantize(f32, gguf_dir / f"{size}-seed0-q4_0.gguf", "Q4_0", args.threads)
            pairs["int4"] = (ensure_int4_bundle(args.work_dir, size, checkpoint), q4)
        reference = None
        for precision, (path, gguf) in pairs.items():
            bundle = ModelBundle(
                path,
                providers=["CPUExecutionProvider"],
                intra_op_threads=args.threads,
                allow_spinning=args.allow_spinning,
            )
            prompt = long_prompt(bundle, args.prompt_tokens)
            log(f"[{size}] {precision}: {path.name} against {gguf.name}")
            pair, greedy = compare_pair(peer, bundle, gguf, args, prompt, reference, **overrides)
            reference = reference or greedy
            figures.update({f"{size}_{precision}_{k}": v for k, v in pair.items()})
    headline = "small" if "small" in sizes else sizes[0]
    for key, source in {
        "decode_vs_llamacpp": "f32_decode_vs_llamacpp",
        "aggregate16_vs_llamacpp": "f32_aggregate16_vs_llamacpp",
        "int4_decode_vs_q4_0": "int4_decode_vs_llamacpp",
        "ttft_vs_llamacpp": "f32_ttft_vs_llamacpp",
    }.items():
        if f"{headline}_{source}" in figures:
            figures[key] = figures[f"{headline}_{source}"]
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    report(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
