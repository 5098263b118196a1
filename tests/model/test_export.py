"""The exported graphs: names and layout (transformers.js Gemma 4 layout), parity with PyTorch on
real inputs (max |diff| <= 1e-4 in fp32), the embedded bundle being current, fp16 and int4 exports.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch
from PIL import Image
from skimage import data as skdata

from gemma_mesh.model.bundle import ModelBundle, embedded_bundle_path
from gemma_mesh.model.bundle_diff import stale_files
from gemma_mesh.model.export.exporter import export_bundle
from gemma_mesh.model.generation import PromptInput, generate

FP32_BOUND = 1e-4


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint: Path):
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def test_graph_names_follow_the_gemma4_onnx_layout(tiny_bundle):
    graphs = tiny_bundle.manifest.graphs
    assert set(graphs) == {
        "embed_tokens",
        "audio_subsample",
        "audio_conformer",
        "vision_encoder",
        "decoder_model_merged",
    }
    names = lambda specs: [s.name for s in specs]  # noqa: E731
    assert names(graphs["embed_tokens"].inputs) == ["input_ids"]
    assert names(graphs["embed_tokens"].outputs) == ["inputs_embeds", "per_layer_inputs"]
    assert names(graphs["audio_subsample"].inputs) == ["input_features", "input_features_mask"]
    assert names(graphs["audio_subsample"].outputs) == ["audio_embeddings", "audio_embeddings_mask"]
    assert names(graphs["audio_conformer"].inputs) == ["audio_embeddings", "audio_embeddings_mask"]
    assert names(graphs["audio_conformer"].outputs) == ["audio_features"]
    assert names(graphs["vision_encoder"].inputs) == ["pixel_values", "pixel_position_ids"]
    assert names(graphs["vision_encoder"].outputs) == ["image_features"]

    text = tiny_bundle.manifest.text
    decoder = graphs["decoder_model_merged"]
    # Only layers that own a KV cache appear; KV-shared tail layers read their producer's cache.
    shared = [i for i, layer in enumerate(text.layers) if layer.kv_source != i]
    assert shared == list(range(text.num_hidden_layers - len(shared), text.num_hidden_layers)) and shared
    kv_in = [f"past_key_values.{i}.{p}" for i in text.kv_layers for p in ("key", "value")]
    assert names(decoder.inputs) == [
        "inputs_embeds",
        "per_layer_inputs",
        "attention_mask",
        "sliding_attention_mask",
        "position_ids",
        "logits_indices",
        *kv_in,
    ]
    # logits are [B, K, V] for the K positions asked for (a prefill needs only its last).
    assert (
        decoder.input("logits_indices").shape[1]
        == next(o for o in decoder.outputs if o.name == "logits").shape[1]
    )
    assert names(decoder.outputs) == ["logits", *[n.replace("past_key_values", "present") for n in kv_in]]
    # Batch and sequence axes are dynamic; the global head dim differs from the local one.
    assert all(isinstance(d, str) for d in decoder.input("inputs_embeds").shape[:2])
    head_dims = {text.layers[i].type: text.layers[i].head_dim for i in text.kv_layers}
    assert head_dims["full_attention"] != head_dims["sliding_attention"]
    for i in text.kv_layers:
        shape = decoder.input(f"past_key_values.{i}.key").shape
        assert shape[1] == text.layers[i].num_key_value_heads and shape[3] == text.layers[i].head_dim
        assert isinstance(shape[0], str) and isinstance(shape[2], str)
        # present.i holds the step's own keys/values (the graph never copies the past): its length
        # is the step's length, not past + step.
        present = next(o for o in decoder.outputs if o.name == f"present.{i}.key").shape
        assert present[2] == decoder.input("inputs_embeds").shape[1]
    for name, entry in graphs.items():
        assert entry.max_abs_diff_vs_torch <= FP32_BOUND, name


def test_embedded_bundle_is_regenerated_by_make_tiny_and_export(tiny_bundle_dir: Path):
    embedded = embedded_bundle_path()
    assert (embedded / "manifest.json").exists()
    stale = stale_files(tiny_bundle_dir, embedded)
    assert stale == [], f"run scripts/build_embedded_bundle.py; stale files: {stale}"
    total = sum(p.stat().st_size for p in embedded.iterdir())
    assert total < 8 * 1024 * 1024


def test_graphs_carry_no_local_paths(tiny_bundle_dir: Path):
    for path in tiny_bundle_dir.glob("*.onnx"):
        model = onnx.load(str(path))
        assert all(len(node.metadata_props) == 0 for node in model.graph.node), path.name


def test_vision_encoder_matches_torch_on_a_real_photo(tiny_bundle, torch_model):
    image = Image.fromarray(skdata.coffee())
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    pre = tiny_bundle.image_processor.preprocess(
        tiny_bundle.image_processor.decode_image(buf.getvalue()), 140
    )
    (ours,) = tiny_bundle.encode_images([pre])
    with torch.no_grad():
        ref = torch_model.model.get_image_features(
            torch.from_numpy(pre.pixel_values)[None], torch.from_numpy(pre.position_ids)[None]
        ).pooler_output[0]
    assert ours.shape == tuple(ref.shape) == (pre.num_soft_tokens, tiny_bundle.manifest.text.hidden_size)
    assert np.max(np.abs(ours - ref.numpy())) <= FP32_BOUND


def test_audio_encoder_matches_torch_on_real_speech(tiny_bundle, torch_model, librivox_clips):
    wav, rate = sf.read(librivox_clips[1], dtype="float32")
    assert rate == 16_000
    features, mask = tiny_bundle.log_mel(wav)
    ours = tiny_bundle.encode_audio(wav)
    with torch.no_grad():
        out = torch_model.model.get_audio_features(
            torch.from_numpy(features)[None], torch.from_numpy(mask)[None]
        )
    ref = out.pooler_output[0][out.attention_mask[0]].numpy()
    assert ours.shape == ref.shape and ours.shape[0] == tiny_bundle.log_mel.num_soft_tokens(wav.shape[0])
    assert np.max(np.abs(ours - ref)) <= FP32_BOUND


def test_audio_subsample_graph_matches_the_towers_subsampling(tiny_bundle, torch_model, librivox_clips):
    """The first of the two audio graphs alone: embeddings and token mask of the conformer's input."""
    wav, _ = sf.read(librivox_clips[1], dtype="float32")
    features, mask = tiny_bundle.log_mel(wav[: 3 * 16_000 + 123])
    frames = features.shape[0] + -features.shape[0] % 4
    padded = np.zeros((1, frames, features.shape[1]), np.float32)
    padded_mask = np.zeros((1, frames), bool)
    padded[0, : features.shape[0]], padded_mask[0, : mask.shape[0]] = features, mask
    ours, ours_mask = tiny_bundle.audio_subsample(padded, padded_mask)
    with torch.no_grad():
        ref, ref_mask = torch_model.model.audio_tower.subsample_conv_projection(
            torch.from_numpy(padded), torch.from_numpy(padded_mask)
        )
    assert ours.shape == tuple(ref.shape) and ours.shape[1] == frames // 4
    assert (ours_mask == ref_mask.numpy()).all() and ours_mask.sum() == -(-int(mask.sum()) // 4)
    assert np.max(np.abs(ours - ref.numpy())) <= FP32_BOUND


def test_decoder_prefill_and_decode_match_torch_logits(tiny_bundle, torch_model):
    built = tiny_bundle.prompt_builder.build([{"role": "user", "content": "Count from one to ten, slowly."}])
    ids = built.input_ids
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    from gemma_mesh.model.generation import DecoderRunner, KVCache, embed_prompt

    runner = DecoderRunner(tiny_bundle)
    split = ids.shape[0] - 3
    embeds, per_layer = embed_prompt(tiny_bundle, ids)
    valid = np.ones((1, ids.shape[0]), dtype=bool)
    positions = np.arange(ids.shape[0])[None]
    logits_a, cache = runner.step(
        embeds[None, :split],
        per_layer[None, :split],
        valid[:, :split],
        positions[:, :split],
        KVCache.empty(tiny_bundle, 1),
    )
    logits_b, cache = runner.step(
        embeds[None, split:], per_layer[None, split:], valid, positions[:, split:], cache
    )
    ours = np.concatenate([logits_a[0], logits_b[0]])
    assert cache.length == ids.shape[0]
    assert np.max(np.abs(ours - ref)) <= FP32_BOUND


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "weights", "op", "min_correlation"),
    # Measured on the tiny model: fp16 logits correlate 0.9999+ with fp32 (top-1 identical);
    # int4 (block 32, symmetric) on random, unstructured weights is lossy: 0.66-0.95 per position.
    [("float16", "float", "MatMul", 0.999), ("float32", "int4", "MatMulNBits", 0.5)],
)
def test_reduced_precision_exports(
    tiny_checkpoint, tiny_bundle, tmp_path, dtype, weights, op, min_correlation
):
    out = tmp_path / f"{dtype}-{weights}"
    manifest = export_bundle(
        tiny_checkpoint,
        out,
        dtype=dtype,
        weights=weights,
        graphs=("embed_tokens", "decoder_model_merged"),
        progress=False,
    )
    assert manifest["dtype"] == dtype and manifest["weights"] == weights
    assert json.loads((out / "manifest.json").read_text())["weights"] == weights
    graph = onnx.load(str(out / "decoder_model_merged.onnx"))
    assert any(node.op_type == op for node in graph.graph.node)
    reduced = ModelBundle(out, providers=["CPUExecutionProvider"])
    assert reduced.float_dtype == np.dtype(np.float16 if dtype == "float16" else np.float32)
    ids = tiny_bundle.prompt_builder.build(
        [{"role": "user", "content": "A story about a lighthouse."}]
    ).input_ids
    # Teacher-forced logits over the prompt, compared with the fp32 bundle position by position.
    from gemma_mesh.model.generation import DecoderRunner, KVCache, embed_prompt

    def logits(bundle):
        e, p = embed_prompt(bundle, ids)
        out, _ = DecoderRunner(bundle).step(
            e[None],
            p[None],
            np.ones((1, ids.shape[0]), bool),
            np.arange(ids.shape[0])[None],
            KVCache.empty(bundle, 1),
        )
        return out[0].astype(np.float32)

    ref, got = logits(tiny_bundle), logits(reduced)
    correlation = float(np.mean([np.corrcoef(ref[i], got[i])[0, 1] for i in range(ids.shape[0])]))
    assert correlation >= min_correlation
    if dtype == "float16":
        assert np.array_equal(ref.argmax(-1), got.argmax(-1))
    steps = list(generate(reduced, [PromptInput(ids)], max_new_tokens=5))
    assert len(steps) >= 1 and all(isinstance(step[0], int) for step in steps[:1])


def test_bundle_comparison_tolerates_only_measurement_noise(tiny_bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"]["decoder_model_merged"]["max_abs_diff_vs_torch"] = 9e-5  # another ORT release
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert stale_files(copy, tiny_bundle_dir) == []
    manifest["graphs"]["decoder_model_merged"]["max_abs_diff_vs_torch"] = 2e-4  # over the bound
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert stale_files(copy, tiny_bundle_dir) == ["manifest.json"]
    data = bytearray((copy / "embed_tokens.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "embed_tokens.onnx").write_bytes(bytes(data))
    assert stale_files(copy, tiny_bundle_dir) == ["embed_tokens.onnx", "manifest.json"]
