"""``logprobs`` / ``top_logprobs`` in chat completions through the official ``openai`` client, against
a real gateway in front of the real mesh on the tiny bundle, compared with transformers' logits.

The values must equal the log-softmax of ``Gemma4ForConditionalGeneration``'s logits at every answer
position (1e-4), the chosen token being transformers' greedy choice.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest

from gemma_mesh.gateway.settings import GatewaySettings
from tests.conftest import reference_generate

MODEL = GatewaySettings().served_model_name
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _reference_logprobs(tiny_bundle, torch_reference, tokens: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy answer ids (stop token dropped) and log-softmax rows ``[n, V]``."""
    import torch

    model, _ = torch_reference
    prompt = tiny_bundle.prompt_builder.build(ASK).input_ids
    answer = reference_generate(torch_reference, prompt, tokens)
    stops = set(tiny_bundle.manifest.stop_token_ids)
    answer = [t for t in answer if t not in stops]
    ids = torch.as_tensor(np.concatenate([prompt, answer]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, prompt.size - 1 : prompt.size - 1 + len(answer)]
    return answer, torch.log_softmax(logits.double(), dim=-1).numpy()


def test_logprobs_equal_transformers_log_softmax(client: openai.OpenAI, tiny_bundle, torch_reference) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    content = response.choices[0].logprobs.content
    answer, reference = _reference_logprobs(tiny_bundle, torch_reference, 12)
    assert len(content) == len(answer) > 0
    tokenizer = tiny_bundle.tokenizer
    for position, (entry, token) in enumerate(zip(content, answer, strict=True)):
        row = reference[position]
        assert abs(entry.logprob - row[token]) < 1e-4, position
        assert entry.logprob == pytest.approx(row.max(), abs=1e-4)  # greedy: the most likely token
        top_ids = np.argsort(-row, kind="stable")[:5]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], row[top_ids], atol=1e-4)
        # Each candidate as its own text, control tokens included (vLLM's and transformers' decode).
        assert [t.token for t in entry.top_logprobs] == [
            tokenizer.decode([int(i)], skip_special_tokens=False) for i in top_ids
        ]
        assert entry.top_logprobs[0].token == entry.token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        if not tokenizer.id_to_token(token).startswith("<0x"):
            assert entry.token == tokenizer.decode([token])
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_streamed_logprobs_equal_the_non_streamed_ones(client: openai.OpenAI) -> None:
    kwargs = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in full
    ]


def test_without_logprobs_there_are_none(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert response.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"top_logprobs": 3}, None)],
)
def test_bad_logprob_requests_are_400s(client: openai.OpenAI, kwargs: dict, param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param
