"""Constrained decoding (llguidance token masks) in the engine and through the gRPC decoder.

Real ONNX Runtime sessions on the tiny bundle and real llguidance grammars. The tiny model's
weights are random, so a constrained answer that validates is the grammar's doing: the tests check
that it always does, that a constrained row in a batch equals its solo run (so do the free rows
beside it), that predicted tokens advance the grammar, and that bad constraints are refused with
llguidance's reason.
"""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import numpy as np
import pytest

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest
from gemma_mesh.decoder.grammar import ConstraintSpec, GrammarState
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.model.sampling import SamplingParams
from gemma_mesh.proto.v1 import decoder_pb2
from tests.grpc_helpers import decoder_stub

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{2,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "verified": {"type": "boolean"},
            },
            "required": ["zip", "verified"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
CHOICE = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
DATE_RE = r"[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9]"
YES_NO_LARK = 'start: answer "." \nanswer: "yes" | "no" | "maybe"'


def _engine(bundle, **overrides) -> Engine:
    settings = DecoderSettings(
        providers=["CPUExecutionProvider"], kv_storage="host", **{"max_batch_size": 16, **overrides}
    )
    engine = Engine(bundle, settings)
    engine.start()
    return engine


def _prompt(bundle, text: str) -> np.ndarray:
    return bundle.prompt_builder.build([{"role": "user", "content": text}]).input_ids


def _collect(handle) -> tuple[list[int], str, Finished]:
    ids, text, finished = [], [], None
    for event in handle.iter_events(timeout_s=120):
        if isinstance(event, Finished):
            finished = event
        else:
            ids += event.token_ids
            text.append(event.text)
    assert finished is not None
    return ids, "".join(text), finished


def _check(spec: ConstraintSpec, text: str) -> None:
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(spec.text))
    elif spec.kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif spec.kind == "regex":
        assert re.fullmatch(spec.text, text), text
    else:
        assert re.fullmatch(r"(yes|no|maybe)\.", text), text


SPECS = [
    ConstraintSpec("json_schema", json.dumps(PERSON)),
    ConstraintSpec("json_schema", json.dumps(CHOICE)),
    ConstraintSpec("regex", DATE_RE),
    ConstraintSpec("lark", YES_NO_LARK),
]


def test_a_batch_of_constrained_and_free_requests_equals_their_solo_runs(tiny_bundle):
    engine = _engine(tiny_bundle)
    try:
        requests = []
        for i in range(16):
            constrained = i % 2 == 0
            sampling = SamplingParams(temperature=0.9, top_k=40, seed=i) if i % 4 < 2 else SamplingParams()
            requests.append(
                GenerationRequest(
                    request_id=f"r{i}",
                    input_ids=_prompt(tiny_bundle, f"request {i}: describe a person as JSON " * (1 + i % 3)),
                    sampling=sampling,
                    max_tokens=96,
                    constraint=engine.grammars.compile(SPECS[(i // 2) % len(SPECS)]) if constrained else None,
                )
            )
        solo = [_collect(engine.submit(r)) for r in requests]
        with engine._cond:  # queued together, admitted together: one batch of 16
            handles = [engine.submit(r) for r in requests]
        batched = [_collect(h) for h in handles]
    finally:
        engine.stop()
    for i, ((ids, text, fin), (solo_ids, solo_text, _)) in enumerate(zip(batched, solo, strict=True)):
        assert ids == solo_ids, f"request {i} differs from its solo run"
        assert text == solo_text
        if i % 2 == 0:  # constrained: a complete, valid answer that ended at the grammar's end
            assert fin.reason.value == "stop", (i, text)
            _check(SPECS[(i // 2) % len(SPECS)], text)
    # The free rows are not JSON by accident: the model's own answer is noise.
    assert not all(t.startswith("{") for _, t, _ in batched[1::2])


def test_predicted_tokens_advance_the_grammar(tiny_bundle):
    engine = _engine(tiny_bundle)
    try:
        constraint = engine.grammars.compile(SPECS[0])
        prompt = _prompt(tiny_bundle, "a person, as JSON")
        plain_ids, plain_text, _ = _collect(
            engine.submit(GenerationRequest("a", prompt, max_tokens=96, constraint=constraint))
        )
        # The right answer as the prediction: every token is accepted and the grammar walks them all.
        ids, text, fin = _collect(
            engine.submit(
                GenerationRequest(
                    "b", prompt, max_tokens=96, constraint=constraint, prediction=np.asarray(plain_ids[:-1])
                )
            )
        )
        # A prediction that leaves the grammar at its third token is rejected there.
        wrong = np.asarray([*plain_ids[:2], *tiny_bundle.tokenizer.encode("zzz").ids])
        wrong_ids, _, wrong_fin = _collect(
            engine.submit(
                GenerationRequest("c", prompt, max_tokens=96, constraint=constraint, prediction=wrong)
            )
        )
    finally:
        engine.stop()
    jsonschema.validate(json.loads(plain_text), PERSON)
    assert (ids, text) == (plain_ids, plain_text)
    assert fin.accepted_prediction_tokens == len(plain_ids) - 1
    assert wrong_ids == plain_ids
    assert wrong_fin.accepted_prediction_tokens == 2


def test_compiled_grammars_are_cached_by_their_text(tiny_bundle):
    engine = _engine(tiny_bundle, grammar_cache_size=2)
    try:
        first = engine.grammars.compile(SPECS[0])
        assert engine.grammars.compile(ConstraintSpec("json_schema", json.dumps(PERSON))) is first
        engine.grammars.compile(SPECS[1])
        engine.grammars.compile(SPECS[2])  # evicts SPECS[0], the least recently used
        assert engine.grammars.compile(SPECS[0]) is not first
        assert (engine.grammars.hits, engine.grammars.misses) == (1, 4)
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (ConstraintSpec("json_schema", '{"type": "frobnicate"}'), "Invalid type: frobnicate"),
        (ConstraintSpec("json_schema", '{"type": "object",'), "not valid JSON"),
        (ConstraintSpec("json_schema", "[1, 2]"), "must be an object or a boolean"),
        (
            ConstraintSpec("json_schema", '{"properties": {"a": {"type": "string", "pattern": "(["}}}'),
            "unclosed character class",
        ),
        (ConstraintSpec("regex", "[a-z"), "unclosed character class"),
        (ConstraintSpec("lark", "start: foo"), 'unknown name: "foo"'),
    ],
)
def test_a_rejected_constraint_names_what_is_wrong(tiny_bundle, spec, needle):
    engine = _engine(tiny_bundle)
    try:
        with pytest.raises(InvalidRequest) as info:
            engine.grammars.compile(spec, param=f"constraint.{spec.kind}")
    finally:
        engine.stop()
    assert needle in info.value.message
    assert info.value.param == f"constraint.{spec.kind}"


def test_with_thinking_the_grammar_starts_after_the_thought_channel(tiny_bundle):
    engine = _engine(tiny_bundle)
    try:
        compiled = engine.grammars.compile(ConstraintSpec("regex", "ok"))
    finally:
        engine.stop()
    manifest = tiny_bundle.manifest
    start, end = manifest.token_id("channel_start"), manifest.token_id("channel_end")
    vocab = manifest.text.vocab_size
    ok_first = tiny_bundle.tokenizer.encode("ok", add_special_tokens=False).ids[0]

    def allowed(state: GrammarState) -> set[int]:
        logits = np.zeros(vocab, np.float32)
        engine.masker.mask_now(state, logits)
        return set(np.flatnonzero(np.isfinite(logits)).tolist())

    kw = dict(channel_start_id=start, channel_end_id=end, stop_token_ids=manifest.stop_token_ids)
    state = GrammarState(compiled, after_thought=True, **kw)
    assert allowed(state) >= {start, ok_first} and len(allowed(state)) <= 3
    for token in (start, 300, 301, 302):  # thoughts are not constrained
        state.accept(token)
        assert not state.masks
    state.accept(end)
    assert state.masks and start not in allowed(state) and ok_first in allowed(state)
    off = GrammarState(compiled, after_thought=False, **kw)
    assert start not in allowed(off) and ok_first in allowed(off)


# --- through the gRPC decoder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(tiny_bundle):
    with decoder_stub(tiny_bundle, max_batch_size=8, max_constraint_chars=4096) as stub:
        yield stub


def _generate(
    stub, constraint: decoder_pb2.Constraint, max_tokens: int = 96
) -> tuple[str, decoder_pb2.Finished]:
    request = decoder_pb2.GenerateRequest(
        messages=[decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(text="answer in JSON")])],
        max_tokens=max_tokens,
        constraint=constraint,
    )
    text, finished = [], None
    for response in stub.Generate(request, timeout=120):
        if response.HasField("delta"):
            text.append(response.delta.text)
        else:
            finished = response.finished
    return "".join(text), finished


def test_grpc_constraints_shape_the_answer(stub):
    text, finished = _generate(stub, decoder_pb2.Constraint(json_schema=json.dumps(PERSON)))
    jsonschema.validate(json.loads(text), PERSON)
    assert finished.reason == decoder_pb2.STOP
    # Any object: random weights may write one longer than max_tokens, but never anything else.
    text, finished = _generate(stub, decoder_pb2.Constraint(json_object=True))
    assert text.startswith("{")
    if finished.reason == decoder_pb2.STOP:
        assert isinstance(json.loads(text), dict)
    text, _ = _generate(stub, decoder_pb2.Constraint(regex=DATE_RE))
    assert re.fullmatch(DATE_RE, text)
    text, _ = _generate(stub, decoder_pb2.Constraint(lark=YES_NO_LARK))
    assert re.fullmatch(r"(yes|no|maybe)\.", text)


@pytest.mark.parametrize(
    ("constraint", "needle"),
    [
        (
            decoder_pb2.Constraint(json_schema='{"type": "frobnicate"}'),
            "constraint.json_schema: the JSON schema",
        ),
        (decoder_pb2.Constraint(regex="(unclosed"), "constraint.regex: the regular expression is invalid"),
        (decoder_pb2.Constraint(lark="start: ("), "constraint.lark: the Lark grammar is invalid"),
        (decoder_pb2.Constraint(regex="a" * 5000), "the limit is 4096 (max_constraint_chars)"),
        (decoder_pb2.Constraint(), "set one of json_schema, json_object, regex, lark"),
    ],
)
def test_grpc_a_rejected_constraint_is_invalid_argument(stub, constraint, needle):
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, constraint)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    # The server keeps serving.
    text, _ = _generate(stub, decoder_pb2.Constraint(regex=DATE_RE))
    assert re.fullmatch(DATE_RE, text)
