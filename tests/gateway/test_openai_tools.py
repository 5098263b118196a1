"""Tool calling in Gemma 4's native format through the official ``openai`` client, against a real
gateway in front of the real mesh on the tiny random-weight bundle.

Random weights never call a tool on their own, so a valid call here is the decoder's call grammar
at work (``tool_choice`` ``required`` or a named function): its name is a tool's and its arguments
validate against that tool's schema. The tool-history prompt is compared with transformers'
``Gemma4Processor.apply_chat_template`` on the same messages.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import openai
import pytest

from gemma_mesh.decoder.grammar import GrammarCompiler
from gemma_mesh.decoder.servicer import build_request
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.gateway.settings import GatewaySettings
from gemma_mesh.proto.v1 import decoder_pb2

MODEL = GatewaySettings().served_model_name
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{2,10}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "detail": {
            "type": "object",
            "properties": {
                "hourly": {"type": "boolean"},
                "fields": {"type": "array", "items": {"enum": ["t", "w"]}, "maxItems": 2},
            },
            "required": ["hourly", "fields"],
        },
    },
    "required": ["city", "unit", "days", "detail"],
}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "clock", "description": "The time.", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "clock": CLOCK}


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _create(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(
        **{"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "temperature": 0, **kwargs}
    )


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [None, 7, 8])
def test_required_makes_valid_calls(client: openai.OpenAI, seed: int | None) -> None:
    sampling = {} if seed is None else {"temperature": 1.0, "seed": seed}
    response = _create(client, tool_choice="required", **sampling)
    choice = response.choices[0]
    # Parallel calls are allowed, so random weights may go on calling until max_tokens: then the
    # calls completed so far are returned (and the unfinished one as text); otherwise every call
    # ended and nothing else was written.
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 200
    else:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
    _check_calls(choice.message.tool_calls)


def test_a_named_tool_is_the_one_called(client: openai.OpenAI) -> None:
    for name in ("clock", "get_weather"):
        choice = _create(client, tool_choice={"type": "function", "function": {"name": name}}).choices[0]
        assert [c.function.name for c in choice.message.tool_calls] == [name]
        _check_calls(choice.message.tool_calls)


def test_parallel_calls_off_gives_one_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        choice = _create(
            client, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed
        ).choices[0]
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls)


def test_streamed_calls_reassemble_to_the_non_streamed_answer(client: openai.OpenAI) -> None:
    full = _create(client, tool_choice="required").choices[0].message
    chunks = list(_create(client, tool_choice="required", stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if delta.id is not None:  # the first fragment of a call: id, type and name
                assert delta.index not in calls and delta.type == "function" and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in full.tool_calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _history(call_id: str = "call_1") -> list[dict]:
    call = {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}
    return [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "21 degrees, clear sky"},
    ]


def test_a_tool_result_turn_renders_as_gemma4_processor(
    client: openai.OpenAI, tiny_bundle, torch_reference
) -> None:
    _, processor = torch_reference
    messages = _history()
    reference = json.loads(json.dumps(messages))  # transformers' template takes arguments as an object
    reference[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "unit": "celsius"}
    expected = processor.apply_chat_template(
        reference, tools=TOOLS, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    expected = np.asarray(expected).reshape(-1)
    # The decoder's prompt for the messages as the gateway sends them (decoder.proto Message fields).
    pb = decoder_pb2.GenerateRequest(
        messages=[
            decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(text=ASK[0]["content"])]),
            decoder_pb2.Message(
                role="assistant",
                content=[decoder_pb2.ContentPart(text="")],
                tool_calls_json=json.dumps(messages[1]["tool_calls"]),
            ),
            decoder_pb2.Message(
                role="tool",
                content=[decoder_pb2.ContentPart(text=messages[2]["content"])],
                tool_call_id="call_1",
            ),
        ],
        max_tokens=8,
        tools_json=json.dumps(TOOLS),
    )
    manifest = tiny_bundle.manifest
    grammars = GrammarCompiler(
        tiny_bundle.tokenizer, vocab_size=manifest.text.vocab_size, stop_token_ids=manifest.stop_token_ids
    )
    ids = build_request(pb, tiny_bundle, DecoderSettings(), grammars).input_ids
    np.testing.assert_array_equal(ids, expected)
    # Through the gateway: the same prompt (its length), and the model continues the turn.
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4)
    assert response.usage.prompt_tokens == expected.size


def test_a_tool_result_without_its_call_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert info.value.body["param"] == "messages"
    assert "must follow an assistant message with tool_calls" in info.value.body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among the tools",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools.0.function.name",
            "pattern",
        ),
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "date"}},
                                "required": ["a"],
                            },
                        },
                    }
                ],
            },
            "tools",
            "unsupported type 'date'",
        ),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(
    client: openai.OpenAI, kwargs: dict, param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, **kwargs)
    body = info.value.body
    assert body["param"] == param and needle in body["message"], body
