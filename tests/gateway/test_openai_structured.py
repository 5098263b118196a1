"""Structured outputs (``response_format`` json_object / json_schema) through the official ``openai``
client, against a real gateway in front of the real mesh on the tiny random-weight bundle.

Random weights write noise, so an answer that validates is the decoder's grammar at work: every
answer that ends (``finish_reason: stop``) must validate, and the schemas here are bounded so that
greedy and seeded answers do end within ``max_tokens``.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from gemma_mesh.gateway.settings import GatewaySettings

MODEL = GatewaySettings().served_model_name
ASK = [{"role": "user", "content": "Describe a user account as JSON."}]
ACCOUNT = {
    "type": "object",
    "properties": {
        "login": {"type": "string", "pattern": "^[a-z]{3,8}$"},
        "age": {"type": "integer", "minimum": 13, "maximum": 99},
        "plan": {"enum": ["free", "pro", "team"]},
        "address": {
            "type": "object",
            "properties": {
                "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "verified": {"type": "boolean"},
            },
            "required": ["country", "verified"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
        "note": {"type": ["string", "null"], "maxLength": 6},
    },
    "required": ["login", "age", "plan", "address", "scores", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "account", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_json_schema_answers_validate(client: openai.OpenAI, seed: int | None) -> None:
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=160, response_format=_schema_format(ACCOUNT), **sampling
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), ACCOUNT)


def test_streamed_json_reassembles_to_the_non_streamed_answer(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 160, "temperature": 0}
    full = client.chat.completions.create(**kwargs, response_format=_schema_format(ACCOUNT, strict=False))
    stream = client.chat.completions.create(**kwargs, response_format=_schema_format(ACCOUNT), stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), ACCOUNT)


class Address(BaseModel):
    country: Literal["DE", "FR", "US"]
    verified: bool


class Account(BaseModel):
    plan: Literal["free", "pro", "team"]
    age: int = Field(ge=13, le=99)
    address: Address
    tags: list[Literal["x", "y"]] = Field(max_length=3)


def test_the_sdk_parse_helper_gets_a_parsed_model(client: openai.OpenAI) -> None:
    """``client.chat.completions.parse`` sends the pydantic model's strict schema and parses the answer."""
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=160, temperature=0, response_format=Account
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Account) and isinstance(parsed.address, Address)


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=64,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        choice = response.choices[0]
        # Any object: random weights may write one past max_tokens, but never anything else.
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize(
    ("response_format", "param", "needle"),
    [
        (_schema_format({"type": "frobnicate"}), "response_format.json_schema.schema", "frobnicate"),
        (
            _schema_format({"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}),
            "response_format.json_schema.schema",
            "unclosed character class",
        ),
        ({"type": "json_schema"}, "response_format", "json_schema is required"),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            "response_format.json_schema.name",
            "pattern",
        ),
        ({"type": "yaml"}, "response_format.type", "json_schema"),
    ],
)
def test_invalid_response_formats_are_400s_naming_the_field(
    client: openai.OpenAI, response_format: dict, param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8, response_format=response_format
        )
    body = info.value.body
    assert info.value.status_code == 400 and body["param"] == param, body
    assert body["message"].startswith(param) and needle in body["message"], body
    # The gateway and the decoder keep serving.
    ok = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=160, temperature=0, response_format=_schema_format(ACCOUNT)
    )
    jsonschema.validate(json.loads(ok.choices[0].message.content), ACCOUNT)
