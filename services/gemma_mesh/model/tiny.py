"""Build a deterministic random Gemma 4 checkpoint in Hugging Face format (``gemma-mesh make-tiny``).

The checkpoint keeps every architectural feature of Gemma 4 E4B at toy sizes, so the exporter,
the runtime and the services are exercised on the same code paths as the real model:

- text decoder: per-layer embeddings (PLE), sliding and full attention layers (full last), KV-shared
  tail layers (one producer per attention type; the cache-owning layers end with a sliding layer
  then a full one, as E4B's layers 22 and 23 do), a global head dim different from the local one,
  proportional RoPE on full layers, final logit softcapping, double-wide MLPs on shared layers;
- audio conformer (USM): stride-2 subsampling convolutions, chunked local attention with relative
  positions, causal light convolutions, clipped linears, output projection;
- vision encoder: patch embedder with 2-D position tables, axial RoPE, clipped linears, 3x3 pooling,
  standardisation;
- a small byte-fallback BPE tokenizer with every Gemma 4 special token and a Gemma 4 chat template
  (``tiny_tokenizer.py``).

Torch and transformers are needed here (the ``export`` extra); serving never imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_mesh.common.logging import get_logger

log = get_logger("make-tiny")


@dataclass(frozen=True)
class TinySize:
    """Sizes of one preset. Names follow ``Gemma4TextConfig`` / ``Gemma4AudioConfig`` / ``Gemma4VisionConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    hidden_size_per_layer_input: int
    num_kv_shared_layers: int
    sliding_window: int
    audio_hidden_size: int
    audio_layers: int
    audio_output_dims: int
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    full_attention_period: int = 3
    use_double_wide_mlp: bool = True
    audio_heads: int = 2
    audio_channels: tuple[int, int] = (128, 8)
    vision_intermediate_size: int = 0  # 0: twice the hidden size
    dtype: str = "float32"


PRESETS: dict[str, TinySize] = {
    # A few MB: tests and the embedded default bundle.
    "tiny": TinySize(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=3,  # layers 0..2 own caches and end sliding, full (check_kv_sharing_layout)
        sliding_window=32,
        audio_hidden_size=32,
        audio_layers=2,
        audio_output_dims=48,
        vision_hidden_size=16,
        vision_layers=2,
        vision_heads=2,
    ),
    # About 100M parameters: decoder benchmarks (bench/decoder.py).
    "small": TinySize(
        vocab_size=32768,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=96,
        global_head_dim=192,
        hidden_size_per_layer_input=64,
        num_kv_shared_layers=3,  # layers 0..8 own caches and end sliding, full
        sliding_window=512,
        audio_hidden_size=128,
        audio_layers=2,
        audio_output_dims=192,
        vision_hidden_size=64,
        vision_layers=2,
        vision_heads=4,
    ),
    # Gemma 4 E4B's own architecture (about 8B parameters with PLE and the towers) with random
    # weights in bf16: measures the time and memory of the real export path without the real weights.
    "e4b": TinySize(
        vocab_size=262_144,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
        sliding_window=512,
        audio_hidden_size=1024,
        audio_layers=12,
        audio_output_dims=1536,
        vision_hidden_size=768,
        vision_layers=16,
        vision_heads=12,
        full_attention_period=6,
        use_double_wide_mlp=False,
        audio_heads=8,
        audio_channels=(128, 32),
        vision_intermediate_size=3072,
        dtype="bfloat16",
    ),
}


def _layer_types(num_layers: int, period: int) -> list[str]:
    """E4B's pattern (five sliding layers, then one full) at another period; the last layer is always full."""
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)]
    types[-1] = "full_attention"
    return types


def check_kv_sharing_layout(layer_types: list[str], num_kv_shared_layers: int) -> None:
    """Refuse a layout whose cache-owning layers do not end with a sliding layer then a full one.

    Gemma 4 E4B (42 layers, the last 18 KV-shared) owns caches in layers 0..23, layer 22 sliding and
    layer 23 full; each shared layer reads the last cache-owning layer of its type
    (``Gemma4TextConfig.kv_sharing_modes``). llama.cpp hard-codes that shape: a shared layer reuses
    layer ``n_layer_kv_from_start - 2`` when sliding, ``- 1`` when full (``llama-model.cpp``), so a
    checkpoint without it does not load there (``GGML_ASSERT(map_layer_ids.find(il_reuse) ...)``).

    Args:
        layer_types: one ``"sliding_attention"`` / ``"full_attention"`` per layer.
        num_kv_shared_layers: how many tail layers reuse an earlier layer's KV cache.

    Raises:
        ValueError: the cache-owning region is shorter than two layers, does not end with
            (sliding, full), or the shared tail lacks a layer of either type.
    """
    first_shared = len(layer_types) - num_kv_shared_layers
    if num_kv_shared_layers == 0:
        return
    if first_shared < 2 or layer_types[first_shared - 2 : first_shared] != [
        "sliding_attention",
        "full_attention",
    ]:
        raise ValueError(
            f"the cache-owning layers 0..{first_shared - 1} must end with a sliding then a full layer "
            f"(as E4B's layers 22 and 23), got {layer_types[max(first_shared - 2, 0) : first_shared]}"
        )
    if set(layer_types[first_shared:]) != {"sliding_attention", "full_attention"}:
        raise ValueError(f"the KV-shared layers {first_shared}.. must include both attention types")


def build_config(size: TinySize, token_ids: dict[str, int]) -> dict[str, Any]:
    """Return the ``Gemma4Config`` keyword arguments for ``size`` with the tokenizer's special-token ids.

    Raises:
        ValueError: the preset's KV-sharing layout differs from E4B's (``check_kv_sharing_layout``).
    """
    layer_types = _layer_types(size.num_hidden_layers, size.full_attention_period)
    check_kv_sharing_layout(layer_types, size.num_kv_shared_layers)
    text_config = {
        "vocab_size": size.vocab_size,
        "vocab_size_per_layer_input": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "head_dim": size.head_dim,
        "global_head_dim": size.global_head_dim,
        "hidden_size_per_layer_input": size.hidden_size_per_layer_input,
        "num_kv_shared_layers": size.num_kv_shared_layers,
        "sliding_window": size.sliding_window,
        "layer_types": layer_types,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1_000_000.0,
            },
        },
        "final_logit_softcapping": 30.0,
        "use_double_wide_mlp": size.use_double_wide_mlp,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131_072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "pad_token_id": token_ids["pad"],
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
    }
    audio_config = {
        "hidden_size": size.audio_hidden_size,
        "num_hidden_layers": size.audio_layers,
        "num_attention_heads": size.audio_heads,
        # The first channel count must stay 128 (= mel bins): the projection input is
        # (channels[0] // 4) * channels[1], i.e. the 32 frequency rows left after two stride-2 convs.
        "subsampling_conv_channels": list(size.audio_channels),
        "conv_kernel_size": 5,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "use_clipped_linears": True,
        "output_proj_dims": size.audio_output_dims,
        "rms_norm_eps": 1e-6,
    }
    vision_config = {
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size or size.vision_hidden_size * 2,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "num_key_value_heads": size.vision_heads,
        "head_dim": size.vision_hidden_size // size.vision_heads,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 10 * 1024,
        "use_clipped_linears": True,
        "standardize": True,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
    }
    return {
        "text_config": text_config,
        "audio_config": audio_config,
        "vision_config": vision_config,
        "boi_token_id": token_ids["boi"],
        "eoi_token_id": token_ids["eoi"],
        "image_token_id": token_ids["image"],
        "video_token_id": token_ids["video"],
        "boa_token_id": token_ids["boa"],
        "eoa_token_index": token_ids["eoa"],
        "audio_token_id": token_ids["audio"],
        "tie_word_embeddings": True,
    }


def _randomize(model: Any, seed: int) -> None:
    """Give every parameter and persistent buffer a deterministic, well-scaled random value.

    transformers' default init (std 0.02, unit norms, infinite clip bounds) leaves logits nearly
    flat and several features inert; here linear weights get std 1/sqrt(fan_in) so activations keep
    their scale, norms scatter around 1, clip bounds are finite (so clipping happens) and the
    per-layer scalars differ from 1, which makes greedy decoding a strong parity check. Values are
    drawn in fp32 chunks of ``chunk`` elements and cast into the tensor's own dtype, so E4B's
    2.8B-entry PLE table never exists in fp32.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    chunk = 1 << 24

    def fill(tensor: torch.Tensor, low: float, high: float, *, gaussian: bool) -> None:
        # gaussian: mean ``low``, std ``high``; else uniform in [low, high).
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - start)
            if gaussian:
                values = torch.randn(n, generator=gen, dtype=torch.float32) * high + low
            else:
                values = torch.rand(n, generator=gen, dtype=torch.float32) * (high - low) + low
            flat[start : start + n].copy_(values)

    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "embed_tokens" in name:
                # Tied with lm_head: std 0.25 gives logits of std ~2 (peaked enough for stable greedy
                # decoding, small enough that fp32 rounding stays far below the 1e-4 parity bound).
                fill(param, 0.0, 0.25, gaussian=True)
            elif "position_embedding_table" in name:
                fill(param, 0.0, 0.5, gaussian=True)
            elif name.endswith("per_dim_scale"):
                fill(param, 0.0, 0.3, gaussian=True)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Gemma 4 attends with scaling 1.0 after q/k RMSNorm: norm weights near d^-1/4 keep
                # q.k of unit scale (as trained weights do); weights near 1 give logits of std sqrt(d),
                # a softmax so sharp that the random network turns fp32 rounding into visible drift.
                fill(param, param.shape[-1] ** -0.25, 0.02, gaussian=True)
            elif param.ndim >= 2:
                fill(param, 0.0, 1.0 / math.sqrt(math.prod(param.shape[1:])), gaussian=True)
            else:  # norm scales scatter around 1, biases around 0
                fill(param, 1.0 if name.endswith("weight") else 0.0, 0.1, gaussian=True)
        persistent = dict(model.state_dict(keep_vars=True))
        for name, buf in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name not in persistent:
                continue  # rotary tables, embed scales: derived from the config
            if name.endswith(("input_min", "output_min")):
                fill(buf, -4.0, -2.0, gaussian=False)
            elif name.endswith(("input_max", "output_max")):
                fill(buf, 2.0, 4.0, gaussian=False)
            elif name.endswith("layer_scalar"):
                fill(buf, 0.6, 1.0, gaussian=False)
            elif name.endswith("std_bias"):
                fill(buf, 0.0, 0.1, gaussian=True)
            elif name.endswith("std_scale"):
                fill(buf, 0.5, 1.5, gaussian=False)


def make_tiny_checkpoint(out_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random Gemma 4 checkpoint that ``AutoProcessor`` and ``Gemma4ForConditionalGeneration`` load.

    Args:
        out_dir: directory to create (overwritten files: config.json, model.safetensors,
            generation_config.json, tokenizer and processor files, chat_template.jinja).
        seed: weights are a pure function of (size, seed).
        size: a key of ``PRESETS`` ("tiny": a few MB; "small": about 100M parameters; "e4b":
            E4B's architecture at full size, ~8B parameters in bf16, for export measurements).

    Returns:
        ``out_dir``.

    Raises:
        KeyError: unknown ``size``.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
        GenerationConfig,
    )

    from gemma_mesh.model.tiny_tokenizer import write_tiny_tokenizer

    preset = PRESETS[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("tokenizer", out=str(out_dir), vocab_size=preset.vocab_size)
    token_ids = write_tiny_tokenizer(out_dir, vocab_size=preset.vocab_size)

    config = Gemma4Config(**build_config(preset, token_ids))
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, preset.dtype))  # E4B is built directly in bf16
    try:
        model = Gemma4ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    _randomize(model, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model", size=size, parameters=n_params, seed=seed)

    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos"],
        pad_token_id=token_ids["pad"],
        eos_token_id=[token_ids["eos"], token_ids["turn_end"], token_ids["tool_response_start"]],
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    chat_template = (out_dir / "chat_template.jinja").read_text(encoding="utf-8")
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=chat_template,
    )
    processor.save_pretrained(out_dir)
    (out_dir / "gemma_mesh_tiny.json").write_text(
        json.dumps({"size": size, "seed": seed, "parameters": n_params}, indent=2) + "\n", encoding="utf-8"
    )
    return out_dir
