"""Shared fixtures: the tiny Gemma 4 checkpoint and its exported bundle, built once per session.

Both are made by the project's own commands (``make-tiny``, ``export``); nothing is downloaded.
Set ``GEMMA_MESH_TEST_CACHE`` to a directory to reuse them across runs while developing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")


def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("GEMMA_MESH_TEST_CACHE")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("gemma4")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ``make-tiny`` checkpoint (seed 0)."""
    from gemma_mesh.model.tiny import make_tiny_checkpoint

    # Named like the embedded bundle's source (scripts/build_embedded_bundle.py), so the exported
    # bundle must equal the embedded one byte for byte.
    out = _cache_dir(tmp_path_factory) / "gemma-mesh-tiny"
    if not (out / "model.safetensors").exists():
        make_tiny_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 bundle exported from ``tiny_checkpoint``."""
    from gemma_mesh.model.export.exporter import export_bundle

    out = _cache_dir(tmp_path_factory) / "tiny-bundle"
    if not (out / "manifest.json").exists():
        export_bundle(tiny_checkpoint, out, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir: Path):
    """A loaded ``ModelBundle`` on the CPU execution provider."""
    from gemma_mesh.model.bundle import ModelBundle

    return ModelBundle(tiny_bundle_dir, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def librivox_clips() -> list[Path]:
    """The five 16 kHz LibriVox clips of Debian's pocketsphinx-testdata."""
    clips = sorted(LIBRIVOX_DIR.glob("*.wav"))
    assert len(clips) == 5, f"pocketsphinx-testdata is not installed ({LIBRIVOX_DIR})"
    return clips


@pytest.fixture(scope="session")
def torch_reference(tiny_checkpoint: Path):
    """transformers' ``Gemma4ForConditionalGeneration`` (fp32) and ``Gemma4Processor`` with the PIL
    image backend (the runtime's preprocessing is Pillow) on the tiny checkpoint."""
    import torch
    from transformers import AutoImageProcessor, AutoProcessor, Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    processor.image_processor = AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="pil")
    return model, processor


def reference_generate(reference, input_ids, max_new_tokens: int, **inputs) -> list[int]:
    """Greedy ``generate()`` continuation of one prompt, cut after the first stop token."""
    import torch

    model, _ = reference
    ids = torch.as_tensor(input_ids, dtype=torch.long)[None]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, **inputs)
    stops = set(model.generation_config.eos_token_id)
    tokens = []
    for t in out[0, ids.shape[1] :].tolist():
        tokens.append(t)
        if t in stops:
            break
    return tokens
