"""Bad input to the in-process pipeline gets ``InvalidRequest`` naming the problem and the limit."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.generation import PromptInput, embed_prompt, generate


def _user(content):
    return [{"role": "user", "content": content}]


def test_empty_and_over_long_audio(tiny_bundle):
    with pytest.raises(InvalidRequest, match="empty"):
        tiny_bundle.encode_audio(np.zeros(0, dtype=np.float32))
    with pytest.raises(InvalidRequest, match=r"480000.*segment|segment.*480000"):
        tiny_bundle.encode_audio(np.zeros(30 * 16_000 + 1, dtype=np.float32))
    # Exactly 30 s is accepted: 750 soft tokens, the manifest's maximum.
    tokens = tiny_bundle.encode_audio(np.zeros(30 * 16_000, dtype=np.float32))
    assert tokens.shape[0] == tiny_bundle.manifest.audio.max_soft_tokens == 750


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 64])
def test_corrupt_or_empty_images(tiny_bundle, data):
    with pytest.raises(InvalidRequest):
        tiny_bundle.image_processor.decode_image(data)


def test_unknown_role_and_media_count_mismatch(tiny_bundle):
    builder = tiny_bundle.prompt_builder
    with pytest.raises(InvalidRequest, match="role"):
        builder.build([{"role": "wizard", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="image"):
        builder.build(
            _user([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]),
            image_soft_tokens=[4],
        )
    with pytest.raises(InvalidRequest):
        builder.build([])


def test_soft_tokens_that_do_not_match_the_placeholders(tiny_bundle):
    prompt = tiny_bundle.prompt_builder.build(
        _user([{"type": "image"}, {"type": "text", "text": "x"}]), image_soft_tokens=[9]
    )
    image_id = tiny_bundle.manifest.token_id("image")
    hidden = tiny_bundle.manifest.text.hidden_size
    with pytest.raises(InvalidRequest, match="soft tokens"):
        embed_prompt(tiny_bundle, prompt.input_ids, [(image_id, np.zeros((10, hidden), np.float32))])
    with pytest.raises(InvalidRequest, match="placeholders"):
        embed_prompt(tiny_bundle, prompt.input_ids, [(image_id, np.zeros((4, hidden), np.float32))])
    with pytest.raises(InvalidRequest, match="no image soft tokens"):
        embed_prompt(tiny_bundle, prompt.input_ids, [])


def test_generation_limits(tiny_bundle):
    ids = tiny_bundle.prompt_builder.build(_user("hi")).input_ids
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        next(generate(tiny_bundle, [PromptInput(ids)], max_new_tokens=0))
    too_long = tiny_bundle.manifest.text.max_position_embeddings
    with pytest.raises(InvalidRequest, match="context length"):
        next(generate(tiny_bundle, [PromptInput(ids)], max_new_tokens=too_long))
    with pytest.raises(InvalidRequest, match="no prompts"):
        next(generate(tiny_bundle, [], max_new_tokens=3))


def _older_format_bundle(tmp_path):
    """A copy of the embedded bundle whose manifest says the previous format (format 2 had one
    ``audio_encoder`` graph; format 1 decoders returned past + step in ``present.N.*``)."""
    import json
    import shutil

    from gemma_mesh.model.bundle import embedded_bundle_path
    from gemma_mesh.model.manifest import BUNDLE_FORMAT_VERSION

    old = tmp_path / "old"
    shutil.copytree(embedded_bundle_path(), old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_FORMAT_VERSION - 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


def test_a_bundle_of_another_format_version_is_refused(tmp_path):
    from gemma_mesh.model.bundle import ModelBundle
    from gemma_mesh.model.manifest import BUNDLE_FORMAT_VERSION

    old = _older_format_bundle(tmp_path)
    with pytest.raises(
        InvalidRequest, match=rf"bundle format {BUNDLE_FORMAT_VERSION - 1} is not supported.*re-export"
    ):
        ModelBundle(old, providers=["CPUExecutionProvider"])


def test_a_missing_graph_file_is_named(tmp_path):
    import shutil

    from gemma_mesh.common.errors import NotFound
    from gemma_mesh.model.bundle import ModelBundle, embedded_bundle_path

    broken = tmp_path / "broken"
    shutil.copytree(embedded_bundle_path(), broken)
    (broken / "audio_subsample.onnx").unlink()
    bundle = ModelBundle(broken, providers=["CPUExecutionProvider"])
    with pytest.raises(NotFound, match=r"'audio_subsample' file audio_subsample\.onnx is missing.*re-export"):
        bundle.encode_audio(np.zeros(16_000, np.float32))
    assert bundle.embed(np.array([[1, 2]]))[0].shape[:2] == (1, 2)  # the other graphs still serve


def test_serve_refuses_a_bad_bundle_in_one_line(tmp_path):
    """``gemma-mesh serve`` with a bundle of an older format: ``error: ...`` and exit 2, no traceback."""
    import subprocess
    import sys

    old = _older_format_bundle(tmp_path)
    argv = [sys.executable, "-m", "gemma_mesh.cli", "serve", "audio", "--bundle", str(old), "--port", "0"]
    done = subprocess.run([*argv, "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"error: invalid bundle manifest {old / 'manifest.json'}" in done.stderr
    assert "is not supported" in done.stderr and "Traceback" not in done.stderr
