"""``gemma-mesh export``: a local Hugging Face Gemma 4 checkpoint -> a model bundle directory.

The bundle (docs/bundle.md) holds ``manifest.json``, the tokenizer, chat template and processor settings
copied from the checkpoint, and five ONNX graphs: ``embed_tokens``, ``audio_subsample`` and
``audio_conformer`` (the audio encoder in two, see ``wrappers``), ``vision_encoder`` and
``decoder_model_merged``.

Memory: the checkpoint is loaded once in its storage dtype (bf16 for E4B, about 16 GB), never in
fp32 as a whole; each graph's modules are cast to the export dtype just before their export,
verified against PyTorch right after, and cast back, so peak memory stays near one copy of the
weights plus the largest graph in the export dtype (measured for E4B in the README).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from gemma_mesh import __version__
from gemma_mesh.common.logging import get_logger
from gemma_mesh.model.manifest import BUNDLE_FORMAT_VERSION, GEMMA4_SPECIAL_TOKENS

log = get_logger("export")

GRAPH_ORDER = (
    "embed_tokens",
    "audio_subsample",
    "audio_conformer",
    "vision_encoder",
    "decoder_model_merged",
)
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
# fp32 parity bound (absolute). fp16 graphs are compared with PyTorch running the same fp16 weights,
# and bounded relative to the output's range: both sides round differently (ORT fuses and
# accumulates in other orders), and on the random tiny model PyTorch's own fp16 output already
# differs from fp32 by ~15% of the logit range. Measured: ORT fp16 vs PyTorch fp16 is ~6%.
FP32_TOLERANCE = 1e-4
FP16_RELATIVE_TOLERANCE = 0.1


def _checkpoint_fingerprint(checkpoint: Path) -> str:
    """sha256 over config.json and the safetensors index/headers (not the weights: E4B is 16 GB)."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in checkpoint.iterdir()):
        path = checkpoint / name
        if name == "config.json" or name.endswith(".safetensors.index.json"):
            digest.update(path.read_bytes())
        elif name.endswith(".safetensors"):
            with path.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(header_len))
    return digest.hexdigest()


def _io_spec(session: Any) -> dict[str, list[dict[str, Any]]]:
    def one(arg: Any) -> dict[str, Any]:
        return {
            "name": arg.name,
            "dtype": arg.type,
            "shape": [d if isinstance(d, int) else str(d) for d in arg.shape],
        }

    return {
        "inputs": [one(a) for a in session.get_inputs()],
        "outputs": [one(o) for o in session.get_outputs()],
    }


def _torch_outputs(spec: Any) -> list[np.ndarray]:
    """The PyTorch wrapper's outputs on ``spec.check`` (inputs sized unlike the export example), as fp32."""
    import torch

    with torch.no_grad():
        expected = spec.module(*spec.check)
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    return [t.float().numpy() for t in expected]


def _open_session(path: Path) -> Any:
    """A lean CPU session for checking a graph: no weight prepacking, basic optimisations only, so a
    9 GB E4B decoder needs about its own size in memory."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _verify(
    spec: Any, session: Any, expected: list[np.ndarray], tolerance: float, *, relative: bool = False
) -> float:
    """Compare ``session`` on ``spec.check`` with ``expected``; return the max |diff|.

    With ``relative``, each output's bound is ``tolerance * max(1, max|reference|)``.

    Raises:
        RuntimeError: a shape mismatch or a difference over the bound.
    """
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, spec.check, strict=True)}
    got = session.run(None, feeds)
    worst = 0.0
    for name, ref_np, out in zip(spec.output_names, expected, got, strict=True):
        if ref_np.shape != out.shape:
            raise RuntimeError(
                f"{spec.name}: output {name} has shape {out.shape}, PyTorch gives {ref_np.shape}"
            )
        diff = float(np.max(np.abs(ref_np - out.astype(np.float32)))) if ref_np.size else 0.0
        bound = tolerance * max(1.0, float(np.max(np.abs(ref_np)))) if relative and ref_np.size else tolerance
        if not diff <= bound:
            raise RuntimeError(
                f"{spec.name}: output {name} differs from PyTorch by {diff:.3g} (> {bound:.3g})"
            )
        worst = max(worst, diff)
    return worst


def _free_torch_model(model: Any) -> None:
    """Drop every parameter's and buffer's storage (the last graph is exported; ORT needs the memory)."""
    import gc

    import torch

    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = torch.empty(0, dtype=tensor.dtype)
    gc.collect()


def _special_tokens(processor: Any) -> dict[str, dict[str, Any]]:
    """Ids of Gemma 4's special tokens, read from the checkpoint's tokenizer (never assumed)."""
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    out: dict[str, dict[str, Any]] = {}
    named = {
        "bos": tok.bos_token,
        "eos": tok.eos_token,
        "pad": tok.pad_token,
        "image": processor.image_token,
        "boi": processor.boi_token,
        "eoi": processor.eoi_token,
        "audio": processor.audio_token,
        "boa": processor.boa_token,
        "eoa": processor.eoa_token,
        "video": processor.video_token,
    }
    for role, text in {**GEMMA4_SPECIAL_TOKENS, **named}.items():
        if text is not None and text in vocab:
            out[role] = {"text": text, "id": int(vocab[text])}
    return out


def _text_section(text_cfg: Any) -> dict[str, Any]:
    modes = text_cfg.kv_sharing_modes
    kv_layers = [i for i, m in enumerate(modes) if m != "reuse"]
    producers: dict[str, int] = {}
    for i in kv_layers:
        producers[text_cfg.layer_types[i]] = (
            i  # the last non-shared layer of each type produces the shared KV
        )
    layers = []
    for i, layer_type in enumerate(text_cfg.layer_types):
        lc = text_cfg.per_layer_config[i]
        layers.append(
            {
                "type": layer_type,
                "num_key_value_heads": int(lc.num_key_value_heads),
                "head_dim": int(lc.head_dim),
                "kv_source": i if i in kv_layers else producers[layer_type],
            }
        )
    return {
        "vocab_size": int(text_cfg.vocab_size),
        "hidden_size": int(text_cfg.hidden_size),
        "num_hidden_layers": int(text_cfg.num_hidden_layers),
        "hidden_size_per_layer_input": int(text_cfg.hidden_size_per_layer_input or 0),
        "sliding_window": int(text_cfg.sliding_window),
        "max_position_embeddings": int(text_cfg.max_position_embeddings),
        "final_logit_softcapping": text_cfg.final_logit_softcapping,
        "use_bidirectional_attention": text_cfg.use_bidirectional_attention,
        "layers": layers,
        "kv_layers": kv_layers,
    }


def _release_unused_for_decoder(model: Any, keep_rows: int) -> None:
    """Free what the decoder graph does not read before exporting it (E4B: ~6.5 GB of 16 GB in bf16):
    the audio and vision towers and all but ``keep_rows`` rows of the per-layer embedding table (the
    decoder takes per_layer_inputs as an input; its check inputs only use ids below ``keep_rows``).
    Without this, E4B's decoder export peaked past 24 GiB and was killed."""
    import torch

    inner = model.model
    for name in ("audio_tower", "vision_tower", "embed_audio", "embed_vision"):
        if getattr(inner, name, None) is not None:
            setattr(inner, name, None)
    table = getattr(inner.language_model, "embed_tokens_per_layer", None)
    if table is not None and table.weight.shape[0] > keep_rows:
        table.weight = torch.nn.Parameter(table.weight[:keep_rows].clone(), requires_grad=False)
    import gc

    gc.collect()


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    weights: str = "float",
    graphs: tuple[str, ...] = GRAPH_ORDER,
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``checkpoint`` to a bundle in ``out_dir`` and return the manifest written there.

    Args:
        checkpoint: a local Hugging Face Gemma 4 checkpoint (``Gemma4ForConditionalGeneration``),
            for example a ``google/gemma-4-E4B-it`` snapshot or ``gemma-mesh make-tiny`` output.
        out_dir: bundle directory (created; existing graph files are replaced).
        dtype: ``float32`` or ``float16`` for weights and activations of the graphs.
        weights: ``float`` (as ``dtype``) or ``int4`` (block-wise 4-bit MatMul weights in the decoder).
        graphs: which graphs to export (all by default).
        progress: show a progress bar per graph on stderr.

    Raises:
        ValueError: unknown dtype/weights, or a checkpoint that is not Gemma 4.
        RuntimeError: a graph whose ONNX Runtime output differs from PyTorch beyond the tolerance.
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoConfig, AutoProcessor, Gemma4ForConditionalGeneration

    from gemma_mesh.model.export import graphs as g
    from gemma_mesh.model.export import wrappers as w

    torch_dtype = {"float32": torch.float32, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if weights not in ("float", "int4"):
        raise ValueError(f"weights must be float or int4, got {weights!r}")
    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    if config.model_type != "gemma4":
        raise ValueError(f"{checkpoint} is a {config.model_type!r} checkpoint, not gemma4")
    if config.text_config.use_bidirectional_attention is not None:
        raise ValueError(
            "use_bidirectional_attention="
            f"{config.text_config.use_bidirectional_attention!r} (bidirectional attention over image tokens) "
            "is not supported by this exporter's causal masks; Gemma 4 E2B/E4B use None"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bundle is valid only once its manifest is written last: drop any old one first, so that a
    # failed re-export never leaves new graphs next to a stale manifest.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    started = time.monotonic()

    # Load in the checkpoint's own storage dtype (bf16 for E4B, fp32 for make-tiny output), never
    # upcast as a whole; each graph's modules are cast to ``dtype`` just before their export.
    model = Gemma4ForConditionalGeneration.from_pretrained(
        checkpoint, dtype="auto", attn_implementation="eager", low_cpu_mem_usage=True
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    text_cfg = config.text_config
    feature_size = int(processor.feature_extractor.feature_size)
    load_dtype = next(model.parameters()).dtype
    no_audio = config.audio_config is None
    missing = {
        "audio_subsample": no_audio,
        "audio_conformer": no_audio,
        "vision_encoder": config.vision_config is None,
    }
    # Fixed order (the decoder last: its export frees the towers), minus towers a text-only checkpoint lacks.
    graphs = tuple(name for name in GRAPH_ORDER if name in graphs and not missing.get(name))

    def spec_for(name: str) -> Any:
        if name == "embed_tokens":
            return g.embed_spec(
                w.EmbedTokens(model.model.language_model).to(torch_dtype), text_cfg.vocab_size
            )
        if name == "audio_subsample":
            return g.audio_subsample_spec(w.AudioSubsample(model).to(torch_dtype), torch_dtype, feature_size)
        if name == "audio_conformer":
            return g.audio_conformer_spec(w.AudioConformer(model).to(torch_dtype), torch_dtype)
        if name == "vision_encoder":
            return g.vision_spec(w.VisionEncoder(model).to(torch_dtype), torch_dtype)
        return g.decoder_spec(w.DecoderWithPast(model).to(torch_dtype), torch_dtype)

    tolerance = FP32_TOLERANCE if dtype == "float32" else FP16_RELATIVE_TOLERANCE
    manifest_graphs: dict[str, Any] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        for name in graphs:
            if name == "decoder_model_merged":
                _release_unused_for_decoder(model, g.CHECK_VOCAB)
            task = bar.add_task(f"{name:>22}", total=4, stage="tracing")
            for stale in (out_dir / f"{name}.onnx", out_dir / f"{name}.onnx.data"):
                stale.unlink(missing_ok=True)
            spec = spec_for(name)
            expected = _torch_outputs(spec)
            bar.update(task, advance=1, stage="exporting")
            path = g.export_graph(spec, out_dir)
            entry: dict[str, Any] = {}
            if name == "decoder_model_merged":  # verified below, fused, against PyTorch
                from gemma_mesh.model.export.fusions import fuse_decoder

                bar.update(task, stage="fusing")
                entry["fusions"] = fuse_decoder(path)
            last = name == graphs[-1]
            if last:  # nothing else needs the PyTorch weights: free them before ONNX Runtime loads the graph
                _free_torch_model(model)
            else:
                spec.module.to(
                    load_dtype
                )  # back to the storage dtype: one graph at a time in the export dtype
            bar.update(task, advance=1, stage="verifying")
            session = _open_session(path)
            max_diff = _verify(spec, session, expected, tolerance, relative=dtype != "float32")
            if weights == "int4" and name == "decoder_model_merged":
                bar.update(task, stage="int4")
                from gemma_mesh.model.export.quantize import quantize_int4

                del session
                quantize_int4(path)
                session = _open_session(path)
                # Recorded, not bounded: 4-bit weights are lossy by design.
                entry["max_abs_diff_vs_torch_before_int4"] = max_diff
                max_diff = _verify(spec, session, expected, float("inf"))
            bar.update(task, advance=1, stage="recording")
            manifest_graphs[name] = {
                "file": path.name,
                **_io_spec(session),
                **entry,
                "max_abs_diff_vs_torch": max_diff,
                "external_data": path.with_suffix(".onnx.data").exists(),
            }
            del session, spec, expected
            bar.update(task, advance=1, stage=f"done (max |diff| {max_diff:.2e})")
            log.info("graph exported", graph=name, file=path.name, max_abs_diff=max_diff)

    for fname in COPIED_FILES:
        src = checkpoint / fname
        if src.exists():
            shutil.copyfile(src, out_dir / fname)

    manifest = build_manifest(
        checkpoint=checkpoint,
        config=config,
        processor=processor,
        graphs=manifest_graphs,
        dtype=dtype,
        weights=weights,
    )
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    log.info("bundle written", out=str(out_dir), seconds=round(time.monotonic() - started, 1))
    return manifest


def build_manifest(
    *, checkpoint: Path, config: Any, processor: Any, graphs: dict[str, Any], dtype: str, weights: str
) -> dict[str, Any]:
    """The bundle contract (``manifest.json``, docs/bundle.md): everything services need to know, read from the checkpoint."""
    fe = processor.feature_extractor
    ip = processor.image_processor
    vp = processor.video_processor
    gen_cfg_path = checkpoint / "generation_config.json"
    gen_cfg = json.loads(gen_cfg_path.read_text()) if gen_cfg_path.exists() else {}
    stop_ids = gen_cfg.get("eos_token_id", config.text_config.eos_token_id)
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "exporter": {"name": "gemma-mesh", "version": __version__},
        "source": {
            "checkpoint": checkpoint.name,
            "model_type": config.model_type,
            "revision": _checkpoint_fingerprint(checkpoint),
        },
        "dtype": dtype,
        "weights": weights,
        "graphs": graphs,
        "text": _text_section(config.text_config),
        "special_tokens": _special_tokens(processor),
        "stop_token_ids": [int(i) for i in stop_ids],
        "vision": {
            "patch_size": int(ip.patch_size),
            "pooling_kernel_size": int(ip.pooling_kernel_size),
            "default_max_soft_tokens": int(ip.max_soft_tokens),
            "supported_soft_tokens": [70, 140, 280, 560, 1120],
            "output_hidden_size": int(config.text_config.hidden_size),
        },
        "video": {
            "max_soft_tokens_per_frame": int(vp.max_soft_tokens),
            "num_frames": int(getattr(vp, "num_frames", 0) or 0),
        },
        "audio": {
            "sampling_rate": int(fe.sampling_rate),
            "feature_size": int(fe.feature_size),
            "ms_per_token": int(processor.audio_ms_per_token),
            "max_soft_tokens": int(processor.audio_seq_length),
            "max_samples": 30 * int(fe.sampling_rate),
            "frames_multiple": 4 * int(config.audio_config.attention_chunk_size)
            if config.audio_config
            else 4,
        },
        "image_seq_length": int(processor.image_seq_length),
    }
