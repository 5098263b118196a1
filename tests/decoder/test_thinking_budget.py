"""The thinking budget: at ``thinking_token_budget`` thought tokens the engine closes the thought
channel itself and no new one opens; ``reasoning_effort`` names the decoder's budgets.

Real ONNX Runtime sessions on the tiny bundle. Random weights seldom think on their own, so a
``logit_bias`` makes the thought channel's opening token the model's first choice everywhere:
the model opens the channel at once, would think forever, and would reopen it after every close.
"""

from __future__ import annotations

import grpc
import pytest

from gemma_mesh.proto.v1 import decoder_pb2
from tests.grpc_helpers import decoder_stub

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def stub(tiny_bundle):
    with decoder_stub(tiny_bundle, thinking_budget_low=3, thinking_budget_medium=9) as stub:
        yield stub


def _ids(stub, tiny_bundle, **kwargs) -> tuple[list[int], str, str]:
    start = tiny_bundle.manifest.token_id("channel_start")
    request = decoder_pb2.GenerateRequest(
        messages=[decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(text="Think first.")])],
        max_tokens=MAX_TOKENS,
        enable_thinking=True,
        sampling=decoder_pb2.SamplingParams(logit_bias={start: 100.0}),
        **kwargs,
    )
    ids, answer, reasoning = [], [], []
    for response in stub.Generate(request, timeout=120):
        if response.HasField("delta"):
            ids += response.delta.token_ids
            (reasoning if response.delta.channel == decoder_pb2.REASONING else answer).append(
                response.delta.text
            )
    return ids, "".join(answer), "".join(reasoning)


@pytest.mark.parametrize(
    ("kwargs", "budget"),
    [
        ({"thinking_token_budget": 5}, 5),
        ({"reasoning_effort": "low"}, 3),
        ({"reasoning_effort": "medium", "thinking_token_budget": 2}, 2),
        ({"reasoning_effort": "medium"}, 9),
    ],
)
def test_the_engine_closes_the_thought_channel_at_the_budget(
    stub, tiny_bundle, kwargs: dict, budget: int
) -> None:
    start, end = (tiny_bundle.manifest.token_id(n) for n in ("channel_start", "channel_end"))
    ids, answer, _ = _ids(stub, tiny_bundle, **kwargs)
    assert ids[0] == start  # the biased model opens the channel
    assert ids[budget + 1] == end  # ... and the engine closes it after `budget` thought tokens
    assert start not in ids[budget + 2 :]  # no new thought once the budget is spent
    assert answer and len(ids) == MAX_TOKENS  # the answer follows


def test_a_zero_budget_never_opens_the_thought_channel(stub, tiny_bundle) -> None:
    start = tiny_bundle.manifest.token_id("channel_start")
    ids, answer, reasoning = _ids(stub, tiny_bundle, thinking_token_budget=0)
    assert start not in ids and answer and reasoning == ""


def test_without_a_budget_the_biased_model_thinks_to_max_tokens(stub, tiny_bundle) -> None:
    end = tiny_bundle.manifest.token_id("channel_end")
    ids, answer, _ = _ids(stub, tiny_bundle)
    assert end not in ids and answer == ""


def test_an_unknown_effort_or_a_negative_budget_is_invalid_argument(stub, tiny_bundle) -> None:
    for kwargs, needle in (
        ({"reasoning_effort": "extreme"}, "reasoning_effort must be one of low, medium, high"),
        ({"thinking_token_budget": -1}, "thinking_token_budget must be >= 0"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            _ids(stub, tiny_bundle, **kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()
