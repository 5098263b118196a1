"""The per-request output policy: thought channels, stop strings, token budget, UTF-8 safety."""

from __future__ import annotations

import pytest

from gemma_mesh.decoder.output import Channel, FinishReason, OutputProcessor


@pytest.fixture(scope="module")
def tok(tiny_bundle):
    return tiny_bundle.tokenizer


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _run(tiny_bundle, tokens, **kwargs):
    m = tiny_bundle.manifest
    proc = OutputProcessor(
        tiny_bundle.tokenizer,
        stop_token_ids=m.stop_token_ids,
        channel_start_id=m.token_id("channel_start"),
        channel_end_id=m.token_id("channel_end"),
        max_tokens=kwargs.pop("max_tokens", 1000),
        **kwargs,
    )
    deltas = []
    for t in tokens:
        deltas += proc.push(t)
        if proc.finish_reason is not None:
            break
    text = {c: "".join(d.text for d in deltas if d.channel == c) for c in Channel}
    ids = [i for d in deltas for i in d.token_ids] + proc.pending_token_ids
    return text, proc, ids


def _thinking_turn(tiny_bundle, tok):
    m = tiny_bundle.manifest
    return [
        m.token_id("channel_start"),
        *_ids(tok, "thought\nThe user greets me."),
        m.token_id("channel_end"),
        *_ids(tok, "Hello there!"),
        m.token_id("turn_end"),
    ]


def test_thoughts_go_to_the_reasoning_channel(tiny_bundle, tok):
    tokens = _thinking_turn(tiny_bundle, tok)
    text, proc, ids = _run(tiny_bundle, tokens, enable_thinking=True)
    assert text[Channel.REASONING] == "The user greets me."
    assert text[Channel.ANSWER] == "Hello there!"
    assert proc.finish_reason == FinishReason.STOP and ids == tokens


def test_thoughts_never_leak_into_the_answer_with_thinking_off(tiny_bundle, tok):
    text, _, _ = _run(tiny_bundle, _thinking_turn(tiny_bundle, tok), enable_thinking=False)
    assert text[Channel.REASONING] == ""
    assert text[Channel.ANSWER] == "Hello there!"


def test_stop_string_is_cut_even_across_tokens(tiny_bundle, tok):
    tokens = _ids(tok, "one two STOP three four")
    text, proc, _ = _run(tiny_bundle, tokens, stop_strings=["STOP"])
    assert text[Channel.ANSWER] == "one two "
    assert proc.finish_reason == FinishReason.STOP


def test_held_back_text_is_released_when_it_is_not_a_stop(tiny_bundle, tok):
    tokens = [*_ids(tok, "one ST two"), tiny_bundle.manifest.token_id("turn_end")]
    text, _, _ = _run(tiny_bundle, tokens, stop_strings=["STOP"])
    assert text[Channel.ANSWER] == "one ST two"


def test_length_limit_and_utf8(tiny_bundle, tok):
    tokens = _ids(tok, "日本語 text")
    text, proc, _ = _run(tiny_bundle, tokens, max_tokens=len(tokens))
    assert text[Channel.ANSWER] == "日本語 text" and proc.finish_reason == FinishReason.LENGTH
    text, proc, _ = _run(tiny_bundle, tokens, max_tokens=2)  # two bytes of the first character
    assert "\ufffd" in text[Channel.ANSWER] or text[Channel.ANSWER] == ""
    assert proc.finish_reason == FinishReason.LENGTH
