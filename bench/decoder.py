#!/usr/bin/env python3
"""Decoder benchmark: gemma-mesh's engine vs transformers eager ``generate()`` on the same checkpoint.

For each model size (the tiny model and a ~100M-parameter "small" random Gemma 4):
- TTFT and single-stream decode tokens/s, ours (in-process engine) and transformers', same prompt;
- aggregate decode tokens/s through the gRPC server (its own process, as deployed) at concurrency
  1, 4, 16 and 64;
- for the small model: the batch-1 decode step time over the bandwidth bound (bytes of decoder
  weights read per step / memory bandwidth measured here with a numpy copy);
- constrained decoding: aggregate tokens/s at ``--constrained-concurrency`` (16) streams with a JSON
  schema (``SCHEMA``: an array of at least 64 records, so the grammar is live for every token) and
  without, measured back to back on the same server, alternating (``--constrained-repeats`` pairs,
  the median pair reported). Target: at most 10 % slower.

Checkpoints and bundles are built once under ``--work-dir``. Prints a table, then one JSON line.

    python bench/decoder.py                      # tiny + small, ~10 minutes on 2 cores
    python bench/decoder.py --sizes tiny --quick # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest  # noqa: E402
from gemma_mesh.decoder.settings import DecoderSettings  # noqa: E402
from gemma_mesh.model.bundle import ModelBundle  # noqa: E402

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
# Records of a log: objects with an integer, an enum, a free string and a nested array, at least 64
# of them, so that no answer can end before max_tokens and every step is masked.
SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "level": {"enum": ["debug", "info", "warning", "error"]},
            "message": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["id", "level", "message", "tags"],
        "additionalProperties": False,
    },
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_bundle(work: Path, size: str) -> tuple[Path, Path]:
    """make-tiny + export for ``size`` under ``work`` (reused when present)."""
    from gemma_mesh.model.export.exporter import export_bundle
    from gemma_mesh.model.tiny import make_tiny_checkpoint

    ckpt, bundle = work / f"{size}-checkpoint", work / f"{size}-bundle"
    if not (ckpt / "model.safetensors").exists():
        log(f"[{size}] make-tiny")
        make_tiny_checkpoint(ckpt, seed=0, size=size)
    if not (bundle / "manifest.json").exists():
        log(f"[{size}] export (fp32)")
        export_bundle(ckpt, bundle, dtype="float32", progress=sys.stderr.isatty())
    return ckpt, bundle


def memory_bandwidth_gbps(mib: int = 512, repeats: int = 5) -> float:
    """STREAM-style copy bandwidth (read + write bytes per second), best of ``repeats``."""
    src = np.ones(mib * 1024 * 1024 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def decoder_weight_bytes(bundle_dir: Path) -> int:
    """Bytes of initializers in the decoder graph: what one batch-1 decode step must read."""
    import onnx

    model = onnx.load(str(bundle_dir / "decoder_model_merged.onnx"), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def transformers_baseline(ckpt: Path, prompt_ids: np.ndarray, tokens: int) -> dict[str, float]:
    """Eager PyTorch ``generate()``: TTFT (1 new token) and decode tokens/s (``tokens`` new tokens)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = Gemma4ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.as_tensor(prompt_ids)[None]

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    run(2)  # warm-up
    ttft = min(run(1) for _ in range(3))
    total = run(tokens)
    return {"ttft_ms": ttft * 1000, "decode_tokens_per_s": (tokens - 1) / max(total - ttft, 1e-9)}


def engine_single_stream(bundle: ModelBundle, prompt_ids: np.ndarray, tokens: int) -> dict[str, float]:
    """Our engine in process, one request at a time (no prefix cache, so TTFT includes the prefill)."""
    settings = DecoderSettings(max_batch_size=1, prefix_cache_bytes=0, providers=["CPUExecutionProvider"])
    engine = Engine(bundle, settings)
    engine.start()
    try:
        results = []
        for _ in range(3):
            handle = engine.submit(GenerationRequest("bench", prompt_ids, max_tokens=tokens, ignore_eos=True))
            finished = next(e for e in handle.iter_events(timeout_s=600) if isinstance(e, Finished))
            results.append(finished)
    finally:
        engine.stop()
    best = min(results, key=lambda f: f.total_s)
    return {
        "ttft_ms": min(f.ttft_s for f in results) * 1000,
        "decode_tokens_per_s": max(f.decode_tokens_per_s for f in results),
        "decode_step_ms": 1000 / max(best.decode_tokens_per_s, 1e-9),
    }


def aggregate_through_grpc(
    bundle_dir: Path, concurrency: list[int], tokens: int, constrained_at: int, repeats: int = 3
) -> tuple[dict[int, float], dict[str, float]]:
    """Decode tokens/s summed over ``c`` concurrent streams (each client runs 2 requests of ``tokens``),
    then at ``constrained_at`` streams without and with ``SCHEMA`` back to back, ``repeats`` pairs,
    the median pair's figures (0 = skip).

    The decoder runs as it is deployed: ``gemma-mesh serve decoder`` in its own process; the clients
    are one grpc.aio event loop in this process (as the gateway calls it), so client-side Python
    does not compete with the engine for the server's GIL.
    """
    return asyncio.run(_aggregate(bundle_dir, concurrency, tokens, constrained_at, repeats))


async def _aggregate(
    bundle_dir: Path, concurrency: list[int], tokens: int, constrained_at: int, repeats: int
) -> tuple[dict[int, float], dict[str, float]]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gemma_mesh.common.grpc_server import message_options
    from gemma_mesh.proto.v1 import decoder_pb2, decoder_pb2_grpc
    from gemma_mesh.up import free_port

    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "GEMMA_MESH_DECODER_MAX_BATCH_SIZE": str(max(*concurrency, constrained_at)),
        "GEMMA_MESH_DECODER_MAX_QUEUE_SIZE": str(4 * max(*concurrency, constrained_at)),
        "GEMMA_MESH_DECODER_PROVIDERS": '["CPUExecutionProvider"]',
    }
    argv = [sys.executable, "-m", "gemma_mesh.cli", "--log-level", "WARNING", "serve", "decoder"]
    argv += ["--bundle", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--metrics-port", str(metrics_port)]
    server = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    out: dict[int, float] = {}
    constrained: dict[str, float] = {}
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=message_options(64 << 20)
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the decoder server exited with {server.returncode}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.2)
            stub = decoder_pb2_grpc.DecoderStub(channel)

            schema = decoder_pb2.Constraint(json_schema=json.dumps(SCHEMA))

            async def one(i: int, constraint: decoder_pb2.Constraint | None = None) -> int:
                part = decoder_pb2.ContentPart(text=f"{PROMPT} ({i})")
                req = decoder_pb2.GenerateRequest(
                    messages=[decoder_pb2.Message(role="user", content=[part])],
                    max_tokens=tokens,
                    ignore_eos=True,
                    constraint=constraint,
                )
                n = 0
                async for response in stub.Generate(req, timeout=1200):
                    if response.HasField("finished"):
                        n = response.finished.usage.completion_tokens
                return n

            async def client(i: int, constraint: decoder_pb2.Constraint | None = None) -> int:
                # One client: two requests back to back.
                return await one(2 * i, constraint) + await one(2 * i + 1, constraint)

            async def rate(c: int, constraint: decoder_pb2.Constraint | None = None) -> float:
                t0 = time.perf_counter()
                generated = sum(await asyncio.gather(*(client(i, constraint) for i in range(c))))
                return generated / (time.perf_counter() - t0)

            await one(0)  # warm-up
            for c in concurrency:
                out[c] = await rate(c)
                log(f"  concurrency {c:>3}: {out[c]:8.1f} tokens/s")
            if constrained_at:
                await one(0, schema)  # warm-up: compiles the schema once (then cached)
                # Free and constrained alternate, ``repeats`` pairs: each pair's ratio sees the same
                # machine load, and the median pair is reported.
                pairs = []
                for _ in range(repeats):
                    free, masked = await rate(constrained_at), await rate(constrained_at, schema)
                    pairs.append((masked / free, free, masked))
                    log(
                        f"  concurrency {constrained_at:>3}: {free:8.1f} tokens/s free, "
                        f"{masked:8.1f} with a JSON schema"
                    )
                _, free, masked = sorted(pairs)[len(pairs) // 2]
                constrained = {"free": free, "json_schema": masked}
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out, constrained


def report(figures: dict) -> None:
    """Every figure on its own line (stderr), then all of them as the last line: one JSON object."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        log(f"{key:<{width}}  {value}")
    print(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--quick", action="store_true", help="16 tokens, concurrency 1,4")
    parser.add_argument(
        "--constrained-concurrency",
        type=int,
        default=16,
        help="streams of the constrained-decoding comparison (0 = skip it)",
    )
    parser.add_argument(
        "--constrained-repeats",
        type=int,
        default=3,
        help="free/JSON-schema pairs; the median pair is reported",
    )
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrency = 16, "1,4"
    concurrency = [int(c) for c in args.concurrency.split(",")]
    figures: dict[str, float | int | str] = {"tokens_per_request": args.tokens}
    bandwidth = memory_bandwidth_gbps()
    figures["memory_bandwidth_gbps"] = round(bandwidth, 2)
    log(f"memory bandwidth (numpy copy): {bandwidth:.1f} GB/s; threads: {threading.active_count()}")
    for size in args.sizes.split(","):
        ckpt, bundle_dir = ensure_bundle(args.work_dir, size)
        bundle = ModelBundle(bundle_dir, providers=["CPUExecutionProvider"])
        prompt_ids = bundle.prompt_builder.build([{"role": "user", "content": PROMPT}]).input_ids
        log(f"[{size}] transformers eager generate()")
        ref = transformers_baseline(ckpt, prompt_ids, args.tokens)
        log(f"[{size}] gemma-mesh engine, single stream")
        ours = engine_single_stream(bundle, prompt_ids, args.tokens)
        log(f"[{size}] gemma-mesh through gRPC, concurrency {concurrency}")
        agg, constrained = aggregate_through_grpc(
            bundle_dir, concurrency, args.tokens, args.constrained_concurrency, args.constrained_repeats
        )
        p = f"{size}_"
        figures.update(
            {
                p + "transformers_ttft_ms": round(ref["ttft_ms"], 2),
                p + "transformers_decode_tokens_per_s": round(ref["decode_tokens_per_s"], 1),
                p + "ttft_ms": round(ours["ttft_ms"], 2),
                p + "decode_tokens_per_s": round(ours["decode_tokens_per_s"], 1),
                p + "decode_speedup_vs_transformers": round(
                    ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 2
                ),
                p + "ttft_speedup_vs_transformers": round(ref["ttft_ms"] / ours["ttft_ms"], 2),
                **{f"{p}aggregate_tokens_per_s_at_{c}": round(v, 1) for c, v in agg.items()},
            }
        )
        if 16 in agg and 1 in agg:
            figures[p + "aggregate_speedup_at_16"] = round(agg[16] / agg[1], 2)
        if constrained:
            c = args.constrained_concurrency
            figures[f"{p}free_tokens_per_s_at_{c}"] = round(constrained["free"], 1)
            figures[f"{p}json_schema_tokens_per_s_at_{c}"] = round(constrained["json_schema"], 1)
            figures[f"{p}json_schema_slowdown_at_{c}"] = round(
                1 - constrained["json_schema"] / constrained["free"], 3
            )
        if size == "small":
            weight_bytes = decoder_weight_bytes(bundle_dir)
            bound_ms = weight_bytes / (bandwidth * 1e9) * 1000
            figures["small_decoder_weight_bytes"] = weight_bytes
            figures["small_decode_step_ms"] = round(ours["decode_step_ms"], 2)
            figures["small_bandwidth_bound_step_ms"] = round(bound_ms, 2)
            figures["decode_step_vs_bandwidth_bound"] = round(ours["decode_step_ms"] / bound_ms, 2)
    headline = "small" if "small" in args.sizes.split(",") else args.sizes.split(",")[0]
    c = args.constrained_concurrency
    for key in ("decode_speedup_vs_transformers", "aggregate_speedup_at_16", f"json_schema_slowdown_at_{c}"):
        if f"{headline}_{key}" in figures:
            figures[key] = figures[f"{headline}_{key}"]
    report(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
