"""Greedy decoding with the exported ONNX graphs equals transformers ``generate()`` token for token.

Reference: ``Gemma4ForConditionalGeneration.generate(do_sample=False)`` on the same tiny checkpoint,
fed by ``Gemma4Processor`` with the PIL image backend (our runtime preprocessing is Pillow; it is
compared to the torchvision backend separately in test_image_processing.py). Ours: the torch-free
runtime (``ModelBundle``, ``PromptBuilder``, ONNX encoders, ``generation.generate``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from skimage import data as skdata

from gemma_mesh.model.generation import PromptInput, generate

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def reference(torch_reference):
    assert type(torch_reference[1].image_processor).__name__ == "Gemma4ImageProcessorPil"
    return torch_reference


@pytest.fixture(scope="module")
def speech(librivox_clips: list[Path]) -> np.ndarray:
    samples, rate = sf.read(librivox_clips[0], dtype="float32")
    assert rate == 16_000
    return samples[: 3 * rate]  # 3 s of real speech


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _reference_tokens(reference, messages, *, images=(), audios=(), enable_thinking=False) -> list[list[int]]:
    model, processor = reference
    batch = messages if isinstance(messages[0], list) else [messages]
    inputs = processor.apply_chat_template(
        batch,
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
        enable_thinking=enable_thinking,
    )
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    stops = set(model.generation_config.eos_token_id)
    result = []
    for row in out[:, prompt_len:].tolist():
        tokens = []
        for t in row:
            tokens.append(t)
            if t in stops:
                break
        result.append(tokens)
    return result


def _our_tokens(bundle, prompts: list[PromptInput]) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in prompts]
    for step in generate(bundle, prompts, max_new_tokens=MAX_NEW_TOKENS):
        for b, t in enumerate(step):
            if t is not None:
                rows[b].append(t)
    return rows


def _our_prompt(bundle, messages, images=(), audios=()) -> PromptInput:
    processed = [bundle.image_processor.preprocess(bundle.image_processor.decode_image(b)) for b in images]
    image_tokens = bundle.encode_images(processed)
    audio_tokens = [bundle.encode_audio(a) for a in audios]
    built = bundle.prompt_builder.build(
        messages,
        image_soft_tokens=[t.shape[0] for t in image_tokens],
        audio_soft_tokens=[t.shape[0] for t in audio_tokens],
    )
    soft = [(bundle.manifest.token_id("image"), t) for t in image_tokens]
    soft += [(bundle.manifest.token_id("audio"), t) for t in audio_tokens]
    return PromptInput(built.input_ids, soft)


def test_text_only(tiny_bundle, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Write a short poem about the sea."}]}]
    expected = _reference_tokens(reference, messages)
    ours = _our_tokens(tiny_bundle, [_our_prompt(tiny_bundle, messages)])
    assert ours == expected
    assert len(ours[0]) >= 8  # the comparison covers real decoding, not an immediate stop


def test_image_and_text(tiny_bundle, reference):
    photo = skdata.astronaut()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.fromarray(photo)},
                {"type": "text", "text": "Describe it."},
            ],
        }
    ]
    expected = _reference_tokens(reference, messages)
    ours = _our_tokens(tiny_bundle, [_our_prompt(tiny_bundle, messages, images=[_png(photo)])])
    assert ours == expected


def test_audio_and_text(tiny_bundle, reference, speech):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": speech},
                {"type": "text", "text": "Transcribe this audio."},
            ],
        }
    ]
    expected = _reference_tokens(reference, messages)
    ours = _our_tokens(tiny_bundle, [_our_prompt(tiny_bundle, messages, audios=[speech])])
    assert ours == expected


def test_image_audio_and_text(tiny_bundle, reference, speech):
    photo = skdata.chelsea()
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.fromarray(photo)},
                {"type": "audio", "audio": speech},
                {"type": "text", "text": "What do you see and hear?"},
            ],
        },
    ]
    expected = _reference_tokens(reference, messages)
    ours = _our_tokens(
        tiny_bundle, [_our_prompt(tiny_bundle, messages, images=[_png(photo)], audios=[speech])]
    )
    assert ours == expected


def test_prompt_longer_than_three_sliding_windows(tiny_bundle, reference):
    window = tiny_bundle.manifest.text.sliding_window
    text = " ".join(f"word{i} is followed by another word" for i in range(40))
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    ours_prompt = _our_prompt(tiny_bundle, messages)
    assert ours_prompt.input_ids.shape[0] > 3 * window
    expected = _reference_tokens(reference, messages)
    assert _our_tokens(tiny_bundle, [ours_prompt]) == expected


def test_batch_of_two_prompts_of_different_lengths(tiny_bundle, reference):
    first = [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}]
    second = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me a long story about three dragons."}]}
    ]
    expected = _reference_tokens(reference, [first, second])
    prompts = [_our_prompt(tiny_bundle, first), _our_prompt(tiny_bundle, second)]
    assert prompts[0].input_ids.shape[0] != prompts[1].input_ids.shape[0]
    assert _our_tokens(tiny_bundle, prompts) == expected
