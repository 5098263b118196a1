"""Logit processors in chat completions through the official ``openai`` client, against a real
gateway in front of the real mesh on the tiny bundle, compared with transformers on the same
checkpoint: greedy answers under ``repetition_penalty`` equal ``generate(repetition_penalty=...)``;
under ``presence_penalty``/``frequency_penalty`` they equal a greedy loop over transformers'
logits with OpenAI's / vLLM's formula; ``logit_bias`` +100 makes a token the only choice.
"""

from __future__ import annotations

import uuid

import numpy as np
import openai
import pytest

from gemma_mesh.gateway.settings import GatewaySettings
from tests.conftest import reference_generate

MODEL = GatewaySettings().served_model_name
ASK = [{"role": "user", "content": "Tell me about the sea."}]
TOKENS = 16


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _answer(client: openai.OpenAI, **kwargs) -> list[bytes]:
    """The greedy answer's tokens, as the bytes each stands for (from ``logprobs``)."""
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=TOKENS, temperature=0, logprobs=True, **kwargs
    )
    return [bytes(entry.bytes) for entry in response.choices[0].logprobs.content]


def _text(tiny_bundle, ids: list[int]) -> list[bytes]:
    """The bytes each of ``ids`` stands for (byte-fallback tokens: their byte), stop tokens dropped."""
    stops = set(tiny_bundle.manifest.stop_token_ids)
    out = []
    for token in ids:
        if token in stops:
            continue
        piece = tiny_bundle.tokenizer.id_to_token(token)
        if piece.startswith("<0x") and len(piece) == 6:
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(tiny_bundle.tokenizer.decode([token], skip_special_tokens=False).encode())
    return out


def test_repetition_penalty_equals_transformers_generate(client, tiny_bundle, torch_reference) -> None:
    prompt = tiny_bundle.prompt_builder.build(ASK).input_ids
    plain = _answer(client)
    for penalty in (1.5, 0.7):
        expected = reference_generate(torch_reference, prompt, TOKENS, repetition_penalty=penalty)
        got = _answer(client, extra_body={"repetition_penalty": penalty})
        assert got == _text(tiny_bundle, expected)
    assert _answer(client, extra_body={"repetition_penalty": 1.5}) != plain


def _greedy_with_penalties(
    torch_reference, prompt: np.ndarray, presence: float, frequency: float
) -> list[int]:
    """Greedy decoding over transformers' logits with OpenAI's penalties (vLLM's apply_penalties)."""
    import torch

    model, _ = torch_reference
    stops = set(model.generation_config.eos_token_id)
    ids = list(prompt)
    out: list[int] = []
    counts: dict[int, int] = {}
    with torch.no_grad():
        for _ in range(TOKENS):
            logits = model(input_ids=torch.as_tensor([ids])).logits[0, -1].double()
            for token, count in counts.items():
                logits[token] -= frequency * count + presence
            token = int(torch.argmax(logits))
            out.append(token)
            if token in stops:
                break
            counts[token] = counts.get(token, 0) + 1
            ids.append(token)
    return out


def test_presence_and_frequency_penalties_equal_the_reference(client, tiny_bundle, torch_reference) -> None:
    prompt = tiny_bundle.prompt_builder.build(ASK).input_ids
    for presence, frequency in ((1.5, 0.0), (0.0, 1.2), (0.8, 0.6)):
        expected = _greedy_with_penalties(torch_reference, prompt, presence, frequency)
        got = _answer(client, presence_penalty=presence, frequency_penalty=frequency)
        assert got == _text(tiny_bundle, expected), (presence, frequency)


def test_logit_bias_forces_a_token(client, tiny_bundle) -> None:
    token = tiny_bundle.tokenizer.encode("sea", add_special_tokens=False).ids[0]
    text = tiny_bundle.tokenizer.decode([token])
    assert _answer(client, logit_bias={str(token): 100}) == [text.encode()] * TOKENS
    assert [text.encode()] * TOKENS != _answer(client, logit_bias={str(token): -100})


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "sampling.logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"n": 9}, "n"),
    ],
)
def test_bad_processor_settings_are_400s(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param, info.value.body


# --- n > 1 ------------------------------------------------------------------------------------


def _cached_prompt_tokens(backends) -> float:
    registry = backends.decoder_server.engine.metrics.registry
    return registry.get_sample_value("gemma_mesh_decoder_cached_prompt_tokens_total") or 0.0


def test_n_seeded_choices_equal_solo_runs_with_derived_seeds(client: openai.OpenAI, backends) -> None:
    # A prompt no earlier request had: choice 0 prefills it, the others restore its KV.
    messages = [
        {"role": "user", "content": f"Write a list of rivers ({uuid.uuid4().hex}), with their lengths."}
    ]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 1.0}
    before = _cached_prompt_tokens(backends)
    both = client.chat.completions.create(**kwargs, n=3, seed=41)
    shared = _cached_prompt_tokens(backends) - before
    solo = [client.chat.completions.create(**kwargs, seed=41 + i) for i in range(3)]
    assert [c.index for c in both.choices] == [0, 1, 2]
    assert [c.message.content for c in both.choices] == [s.choices[0].message.content for s in solo]
    assert len({c.message.content for c in both.choices}) > 1  # different seeds, different answers
    assert both.usage.prompt_tokens == solo[0].usage.prompt_tokens
    assert both.usage.completion_tokens == sum(s.usage.completion_tokens for s in solo)
    # Choices 1 and 2 restored choice 0's prompt (up to its last prefix-cache snapshot).
    assert shared >= 2 * (solo[0].usage.prompt_tokens - 16) > 0


def test_n_streamed_choices_reassemble_to_the_non_streamed_ones(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 10, "temperature": 0.8, "seed": 5, "n": 2}
    full = client.chat.completions.create(**kwargs)
    texts, finished = ["", ""], [None, None]
    for chunk in client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == full.usage.completion_tokens
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert texts == [c.message.content for c in full.choices]
    assert finished == [c.finish_reason for c in full.choices]


def test_a_thinking_budget_closes_the_thoughts_and_the_answer_follows(
    client: openai.OpenAI, tiny_bundle
) -> None:
    """A bias makes the tiny model open the thought channel and never leave it; the budget closes it."""
    start = tiny_bundle.manifest.token_id("channel_start")
    kwargs = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 30,
        "temperature": 0,
        "logit_bias": {str(start): 100},
    }
    unbounded = client.chat.completions.create(
        **kwargs, reasoning_effort="high", extra_body={"thinking_token_budget": 1000}
    )
    bounded = client.chat.completions.create(
        **kwargs, reasoning_effort="low", extra_body={"thinking_token_budget": 4}
    )
    assert unbounded.choices[0].message.content == ""  # it thought until max_tokens
    assert bounded.choices[0].message.content  # the answer after the closed channel
    assert bounded.choices[0].finish_reason == unbounded.choices[0].finish_reason == "length"
