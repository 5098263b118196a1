"""Example inputs, dynamic axes and names of the five graphs, and the ONNX export of one graph.

``torch.export`` specialises any dimension whose example size is 1 and records equalities between
example sizes, so every example here uses distinct sizes of at least 2 (batch 2, sequence 3, past 5
and 4, ...). Audio frames are a multiple of 4 and vision patches a multiple of k^2, as at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import Dim

# The decoder's check inputs draw token ids below this, so the exporter can drop the rest of the
# per-layer embedding table (5.6 GB for E4B, unused by the decoder graph) before exporting it.
CHECK_VOCAB = 4096

# Graphs over this size are written with their weights in an external ``.onnx.data`` file
# (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


@dataclass
class GraphSpec:
    """What ``torch.onnx.export`` needs for one graph, plus the names the bundle manifest records."""

    name: str
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    check: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple[Any, ...]
    optimize: bool = True
    notes: dict[str, Any] = field(default_factory=dict)


def _dyn(*axes: int) -> dict[int, Any]:
    return dict.fromkeys(axes, Dim.DYNAMIC)


def _kv_example(
    wrapper: Any, batch: int, past_full: int, past_sliding: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    cfg = wrapper.lm.config
    tensors = []
    gen = torch.Generator().manual_seed(past_full * 31 + past_sliding)
    for idx in wrapper.kv_layers:
        layer_cfg = cfg.per_layer_config[idx]
        past = past_full if cfg.layer_types[idx] == "full_attention" else past_sliding
        shape = (batch, layer_cfg.num_key_value_heads, past, layer_cfg.head_dim)
        tensors.append(torch.randn(shape, generator=gen).to(dtype))
        tensors.append(torch.randn(shape, generator=gen).to(dtype))
    return tensors


def _masks(batch: int, seq: int, past: int, window: int | None) -> torch.Tensor:
    """Causal (optionally sliding) boolean mask [B, 1, S, past + S] with the first key of batch row 0 padded."""
    q = torch.arange(seq)[:, None] + past
    k = torch.arange(past + seq)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    mask = allowed[None, None].expand(batch, 1, seq, past + seq).clone()
    mask[0, :, :, 0] = False
    return mask


def decoder_inputs(wrapper: Any, batch: int, seq: int, past_full: int, past_sliding: int, dtype: torch.dtype):
    """Random decoder inputs of the given sizes (``past_sliding`` keys kept for sliding layers)."""
    cfg = wrapper.lm.config
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    embeds = torch.randn((batch, seq, cfg.hidden_size), generator=gen).to(dtype)
    per_layer = torch.randn(
        (batch, seq, cfg.num_hidden_layers, max(cfg.hidden_size_per_layer_input, 1)), generator=gen
    ).to(dtype)
    positions = (torch.arange(seq) + past_full)[None].expand(batch, seq).contiguous()
    return (
        embeds,
        per_layer,
        _masks(batch, seq, past_full, None),
        _masks(batch, seq, past_sliding, cfg.sliding_window),
        positions,
        # K = 6 (positions may repeat): a size no other example axis has, so torch.export keeps it free.
        (torch.arange(6) % seq)[None].expand(batch, 6).contiguous(),
        *_kv_example(wrapper, batch, past_full, past_sliding, dtype),
    )


def _all_positions(batch: int, seq: int) -> torch.Tensor:
    """``logits_indices`` that keep every position ``[B, S]``."""
    return torch.arange(seq)[None].expand(batch, seq).contiguous()


def realistic_decoder_check(wrapper: Any, dtype: torch.dtype, batch: int = 2, prefix: int = 40, seq: int = 5):
    """Decoder check inputs with the statistics of real use: token embeddings from the model's tables
    and a past KV cache produced by prefilling ``prefix`` random tokens through the wrapper itself.

    Random N(0, 1) keys and values are far from what ``k_norm``/``v_norm`` produce, and a random
    network amplifies rounding on such inputs; the parity bound is meant for real states.
    """
    lm = wrapper.lm
    cfg = lm.config
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, min(cfg.vocab_size, CHECK_VOCAB), (batch, prefix + seq), generator=gen)
    with torch.no_grad():
        embeds = lm.embed_tokens(ids).to(dtype)
        per_layer = (
            lm.embed_tokens_per_layer(ids).reshape(batch, prefix + seq, cfg.num_hidden_layers, -1).to(dtype)
        )
        empty = []
        for idx in wrapper.kv_layers:
            layer_cfg = cfg.per_layer_config[idx]
            zeros = torch.zeros((batch, layer_cfg.num_key_value_heads, 0, layer_cfg.head_dim), dtype=dtype)
            empty += [zeros, zeros]
        window = cfg.sliding_window
        positions = torch.arange(prefix)[None].expand(batch, prefix).contiguous()
        out = wrapper(
            embeds[:, :prefix],
            per_layer[:, :prefix],
            _masks(batch, prefix, 0, None),
            _masks(batch, prefix, 0, window),
            positions,
            _all_positions(batch, prefix),
            *empty,
        )
    step_positions = torch.arange(prefix, prefix + seq)[None].expand(batch, seq).contiguous()
    return (
        embeds[:, prefix:].contiguous(),
        per_layer[:, prefix:].contiguous(),
        _masks(batch, seq, prefix, None),
        _masks(batch, seq, prefix, window),
        step_positions,
        _all_positions(batch, seq),  # every position's logits are checked against PyTorch
        *(t.contiguous() for t in out[1:]),
    )


def decoder_spec(wrapper: Any, dtype: torch.dtype) -> GraphSpec:
    """The ``decoder_model_merged`` graph: one step (prefill or decode) with past and present KV."""
    cfg = wrapper.lm.config
    kv_names_in, kv_names_out, kv_dyn = [], [], []
    for idx in wrapper.kv_layers:
        for part in ("key", "value"):
            kv_names_in.append(f"past_key_values.{idx}.{part}")
            kv_names_out.append(f"present.{idx}.{part}")
            kv_dyn.append(_dyn(0, 2))
    window = cfg.sliding_window
    return GraphSpec(
        name="decoder_model_merged",
        module=wrapper,
        example=decoder_inputs(wrapper, 2, 3, 5, 4, dtype),
        check=realistic_decoder_check(wrapper, dtype, prefix=min(window + 8, 48)),
        input_names=[
            "inputs_embeds",
            "per_layer_inputs",
            "attention_mask",
            "sliding_attention_mask",
            "position_ids",
            "logits_indices",
            *kv_names_in,
        ],
        output_names=["logits", *kv_names_out],
        dynamic_shapes=(
            _dyn(0, 1),
            _dyn(0, 1),
            _dyn(0, 2, 3),
            _dyn(0, 2, 3),
            _dyn(0, 1),
            _dyn(0, 1),
            tuple(kv_dyn),  # the wrapper's *past varargs are one tuple to torch.export
        ),
        optimize=True,
    )


def embed_spec(wrapper: Any, vocab_size: int) -> GraphSpec:
    """The ``embed_tokens`` graph."""
    gen = torch.Generator().manual_seed(7)
    return GraphSpec(
        name="embed_tokens",
        module=wrapper,
        example=(torch.randint(0, vocab_size, (2, 3), generator=gen),),
        check=(torch.randint(0, vocab_size, (3, 11), generator=gen),),
        input_names=["input_ids"],
        output_names=["inputs_embeds", "per_layer_inputs"],
        dynamic_shapes=(_dyn(0, 1),),
        optimize=True,
    )


def _audio_inputs(batch: int, frames: int, bins: int, valid: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn((batch, frames, bins), generator=gen)
    mask = torch.zeros((batch, frames), dtype=torch.bool)
    for b, n in enumerate(valid):
        mask[b, :n] = True
    return feats * mask[..., None], mask


def audio_frames_multiple(config: Any) -> int:
    """Frames per audio attention block: 4 (two stride-2 convolutions) x the conformer's chunk size.

    The conformer graph takes tokens in whole blocks. With ``U = chunk * blocks`` every length inside
    the encoder (blocks, padded contexts) is a plain multiple of one symbol; with a free ``U`` the
    nested floor divisions of 12 layers blow up torch.export's symbolic simplifier (E4B's audio
    tower did not finish tracing in 30 minutes). Callers pad with masked frames or tokens, which
    leaves the valid outputs unchanged. ``config`` is the checkpoint's ``Gemma4AudioConfig``.
    """
    return 4 * int(config.attention_chunk_size)


def audio_subsample_spec(wrapper: Any, dtype: torch.dtype, num_mel_bins: int) -> GraphSpec:
    """The ``audio_subsample`` graph; frames must be a multiple of 4."""
    # 9 and 15 tokens: sizes past the convolutions' padding, none of them 1.
    ex = _audio_inputs(2, 4 * 9, num_mel_bins, [4 * 9, 21], seed=3)
    ck = _audio_inputs(3, 4 * 15, num_mel_bins, [4 * 15, 33, 5], seed=4)
    frames = 4 * Dim("audio_tokens", min=2, max=4 * 4096)
    return GraphSpec(
        name="audio_subsample",
        module=wrapper,
        example=(ex[0].to(dtype), ex[1]),
        check=(ck[0].to(dtype), ck[1]),
        input_names=["input_features", "input_features_mask"],
        output_names=["audio_embeddings", "audio_embeddings_mask"],
        dynamic_shapes=({0: Dim.DYNAMIC, 1: frames}, {0: Dim.DYNAMIC, 1: frames}),
        optimize=False,
    )


def audio_conformer_spec(wrapper: Any, dtype: torch.dtype) -> GraphSpec:
    """The ``audio_conformer`` graph; tokens must be a multiple of the attention chunk."""
    config = wrapper.tower.config
    chunk = audio_frames_multiple(config) // 4
    hidden = int(config.hidden_size)

    def inputs(batch: int, tokens: int, valid: list[int], seed: int):
        gen = torch.Generator().manual_seed(seed)
        mask = torch.arange(tokens)[None, :] < torch.tensor(valid)[:, None]
        embeddings = torch.randn((batch, tokens, hidden), generator=gen) * mask[..., None]
        return embeddings.to(dtype), mask

    # 3 blocks in the example (no derived size is 1), 5 in the check.
    ex = inputs(2, 3 * chunk, [3 * chunk, 15], seed=5)
    ck = inputs(3, 5 * chunk, [5 * chunk, 14, 2], seed=6)
    tokens = chunk * Dim("audio_blocks", min=1, max=4096)
    return GraphSpec(
        name="audio_conformer",
        module=wrapper,
        example=ex,
        check=ck,
        input_names=["audio_embeddings", "audio_embeddings_mask"],
        output_names=["audio_features"],
        dynamic_shapes=({0: Dim.DYNAMIC, 1: tokens}, {0: Dim.DYNAMIC, 1: tokens}),
        # The onnxscript optimiser has broken graphs with clipped linears; export them as traced.
        optimize=False,
    )


def _vision_inputs(grids: list[tuple[int, int]], max_patches: int, patch_pixels: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch = len(grids)
    pixels = torch.zeros((batch, max_patches, patch_pixels))
    positions = torch.full((batch, max_patches, 2), -1, dtype=torch.int64)
    for b, (ph, pw) in enumerate(grids):
        n = ph * pw
        pixels[b, :n] = torch.rand((n, patch_pixels), generator=gen)
        xs, ys = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
        positions[b, :n] = torch.from_numpy(np.stack([xs, ys], axis=-1).reshape(n, 2))
    return pixels, positions


def vision_spec(wrapper: Any, dtype: torch.dtype) -> GraphSpec:
    """The ``vision_encoder`` graph. Patches must be a multiple of k^2 (the pooling kernel)."""
    cfg = wrapper.tower.config
    kk = cfg.pooling_kernel_size**2
    patch_pixels = 3 * cfg.patch_size**2
    ex = _vision_inputs([(6, 9), (3, 3)], 8 * kk, patch_pixels, seed=5)
    ck = _vision_inputs([(9, 6), (3, 12), (6, 6)], 12 * kk, patch_pixels, seed=6)
    return GraphSpec(
        name="vision_encoder",
        module=wrapper,
        example=(ex[0].to(dtype), ex[1]),
        check=(ck[0].to(dtype), ck[1]),
        input_names=["pixel_values", "pixel_position_ids"],
        output_names=["image_features"],
        dynamic_shapes=(_dyn(0, 1), _dyn(0, 1)),
        optimize=False,
    )


def _param_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in list(module.parameters()) + list(module.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def export_graph(spec: GraphSpec, out_dir: Path) -> Path:
    """Export ``spec`` to ``out_dir/{name}.onnx`` with torch.export (the TorchScript exporter fails on
    the audio encoder). Graphs over ``EXTERNAL_DATA_THRESHOLD_BYTES`` keep weights in ``{name}.onnx.data``.
    """
    path = out_dir / f"{spec.name}.onnx"
    spec.module.eval()
    external = _param_bytes(spec.module) > EXTERNAL_DATA_THRESHOLD_BYTES
    with torch.no_grad():
        # torch.export first, then ONNX from the ExportedProgram: handing the module and its dynamic
        # shapes to torch.onnx.export directly traces with deferred runtime asserts, whose symbolic
        # simplification did not finish in 30 minutes on E4B's 12-layer audio tower (48 s this way).
        exported = torch.export.export(
            spec.module, spec.example, dynamic_shapes=spec.dynamic_shapes, strict=False
        )
        program = torch.onnx.export(
            exported,
            (),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamo=True,
            optimize=spec.optimize,
            verbose=False,
        )
    program.save(str(path), external_data=external)
    strip_debug_metadata(path)
    return path


def strip_debug_metadata(path: Path) -> None:
    """Remove the exporter's per-node debug metadata (Python stack traces with local file paths and
    line numbers) so that a graph is a pure function of the checkpoint: the same weights export to
    the same bytes on any machine. External weight files are left untouched.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph] + [f for f in model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    del model.metadata_props[:]
    onnx.save(model, str(path))
