"""``Gemma4ToolParser``: Gemma 4 call strings -> OpenAI tool calls, whole and split at every position.

Pure logic: the inputs are the strings Gemma 4's chat template writes for calls (its
``format_call``), the malformed forms peers' issue trackers report from real models, and text
around them.
"""

from __future__ import annotations

import json
import re

import pytest

from gemma_mesh.model.tool_calls import (
    Gemma4ToolParser,
    MalformedCall,
    ParsedDelta,
    ToolSchemaError,
    parse_call,
    tool_call_grammar,
)

START, END, Q = "<|tool_call>", "<tool_call|>", '<|"|>'


def _parser() -> Gemma4ToolParser:
    return Gemma4ToolParser(START, END, Q)


def _run(pieces: list[str]) -> tuple[str, list[tuple[str, dict]], list]:
    """Feed ``pieces``; returns (content, [(name, arguments)], every call delta in order)."""
    parser = _parser()
    deltas: list[ParsedDelta] = [parser.feed(p) for p in pieces] + [parser.finish()]
    content = "".join(d.content for d in deltas)
    call_deltas = [c for d in deltas for c in d.tool_calls]
    calls: dict[int, list] = {}
    for c in call_deltas:
        if c.name is not None:
            assert c.index not in calls and c.id.startswith("call_")
            calls[c.index] = [c.name, ""]
        calls[c.index][1] += c.arguments
    return content, [(name, json.loads(args)) for name, args in calls.values()], call_deltas


def call(name: str, body: str) -> str:
    return f"{START}call:{name}{{{body}}}{END}"


CASES = [
    # (text, content, calls)
    (call("get_weather", f"city:{Q}Paris{Q}"), "", [("get_weather", {"city": "Paris"})]),
    (
        call("f", f'n:42,x:-1.5e3,ok:true,no:false,none:null,s:{Q}a "quoted", {{brace}} : text{Q}'),
        "",
        [
            (
                "f",
                {
                    "n": 42,
                    "x": -1500.0,
                    "ok": True,
                    "no": False,
                    "none": None,
                    "s": 'a "quoted", {brace} : text',
                },
            )
        ],
    ),
    (
        call("book", f"guest:{{name:{Q}Ann{Q},age:31,tags:[{Q}vip{Q},1,[true]]}},rooms:[]"),
        "",
        [("book", {"guest": {"name": "Ann", "age": 31, "tags": ["vip", 1, [True]]}, "rooms": []})],
    ),
    (
        "Let me check. " + call("a", "x:1") + call("b", f"y:{Q}z{Q}") + " Done.",
        "Let me check.  Done.",
        [("a", {"x": 1}), ("b", {"y": "z"})],
    ),
    (call("noargs", ""), "", [("noargs", {})]),
    (f"{Q}hi{Q} there", '"hi" there', []),  # a stray string marker in text is shown as a quote
    ("plain text, no call", "plain text, no call", []),
    (call("u", f"t:{Q}naïve — 東京 ✓{Q}"), "", [("u", {"t": "naïve — 東京 ✓"})]),
    # Malformed forms real models write (repaired):
    (f"{START}call:get_weather(city:{Q}Paris{Q}){END}", "", [("get_weather", {"city": "Paris"})]),
    (f"{START}get_weather{{city:{Q}Paris{Q}}}{END}", "", [("get_weather", {"city": "Paris"})]),
    (f"{START}call:f{{a:{{b:1}}{END}", "", [("f", {"a": {"b": 1}})]),  # closing braces missing
    (f"{START}call:f a:1, b:{Q}x{Q}{END}", "", [("f", {"a": 1, "b": "x"})]),  # no braces
    (f'{START}call:f{{"a": "json", "b": [1, 2,]}}{END}', "", [("f", {"a": "json", "b": [1, 2]})]),
    ("```\n" + call("f", "a:1") + "\n```", "", [("f", {"a": 1})]),  # a fence around the call
    ("Sure:\n```tool_code\n" + call("f", "a:1") + "\n```\nok", "Sure:\n\nok", [("f", {"a": 1})]),
    ("`" + call("f", "a:1") + "`", "", [("f", {"a": 1})]),
    (f"{START}call:f{{a:1}}", "", [("f", {"a": 1})]),  # the end marker never came
    # Malformed beyond repair: content, without control markers.
    (f"{START}call:f{{a:{Q}unterminated}}{END}", 'call:f{a:"unterminated}', []),
    (f"{START}{{a:1}}{END}", "{a:1}", []),
    (f"{START}call:f{{a:1}} trailing{END}", "call:f{a:1} trailing", []),
    (f"{START}call:f{{a:hello world}}{END}", "call:f{a:hello world}", []),
    ("text `code` more", "text `code` more", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_text(text: str, content: str, calls: list) -> None:
    got_content, got_calls, _ = _run([text])
    assert got_content == content
    assert got_calls == calls


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_split_at_every_position(text: str, content: str, calls: list) -> None:
    for at in range(len(text) + 1):
        assert _run([text[:at], text[at:]])[:2] == (content, calls), at
    assert _run(list(text))[:2] == (content, calls)  # one character per delta


def test_name_first_then_arguments_and_ids_differ() -> None:
    text = call("a", "x:1") + call("b", "")
    _, _, deltas = _run([text])
    assert [(d.index, d.name, d.arguments) for d in deltas] == [
        (0, "a", ""),
        (1 - 1, None, '{"x": 1}'),
        (1, "b", ""),
        (1, None, "{}"),
    ]
    assert deltas[0].id != deltas[2].id


def test_content_before_a_call_streams_before_the_call_ends() -> None:
    parser = _parser()
    first = parser.feed("Checking the weather now" + START + "call:get_weather{ci")
    assert first.content == "Checking the weather now" and not first.tool_calls
    assert parser.feed("ty:" + Q + "Oslo" + Q).tool_calls == []
    done = parser.feed("}" + END)
    assert [c.name for c in done.tool_calls if c.name] == ["get_weather"]
    assert parser.calls[0].arguments == '{"city": "Oslo"}'


def test_a_partial_marker_is_held_back_and_released_when_it_is_not_one() -> None:
    parser = _parser()
    assert parser.feed("price <|to").content == "price "
    assert parser.feed("o").content == ""
    assert parser.feed("k> is").content == "<|took> is"
    assert parser.finish().content == ""


def test_parse_call_errors_name_the_problem() -> None:
    with pytest.raises(MalformedCall, match="no function name"):
        parse_call("call:{a:1}", Q)
    with pytest.raises(MalformedCall, match="unterminated string"):
        parse_call(f"call:f{{a:{Q}x}}", Q)
    with pytest.raises(MalformedCall, match="':' expected"):
        parse_call("call:f{a 1}", Q)


# --- the grammar of forced calls --------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2, "maxLength": 4},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer"},
        "note": {"type": "string"},
    },
    "required": ["unit", "city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "noop"}},
]


def _matcher(grammar: str):
    import llguidance

    from gemma_mesh.model.bundle import ModelBundle, embedded_bundle_path

    bundle = ModelBundle(embedded_bundle_path(), providers=["CPUExecutionProvider"])
    m = bundle.manifest
    tok = llguidance.LLTokenizer(
        bundle.tokenizer.to_str(), n_vocab=m.text.vocab_size, eos_token=m.stop_token_ids
    )
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = {name: m.token_id(name) for name in ("tool_call_start", "tool_call_end", "string_delimiter")}

    def accepts(text: str) -> bool:
        """Does the grammar take ``text`` (markers as special tokens) to its end?"""
        marks = {START: ids["tool_call_start"], END: ids["tool_call_end"], Q: ids["string_delimiter"]}
        tokens: list[int] = []
        for piece in re.split(r"(<\|tool_call>|<tool_call\|>|<\|\"\|>)", text):
            if piece in marks:
                tokens.append(marks[piece])
            elif piece:
                tokens += bundle.tokenizer.encode(piece, add_special_tokens=False).ids
        probe = matcher.deep_copy()
        return probe.consume_tokens(tokens) and probe.is_accepting()

    return ids, accepts


def test_the_call_grammar_takes_the_calls_the_template_writes_and_nothing_else() -> None:
    ids, _ = _matcher('start: "x"')  # the markers' ids, from the bundle
    kw = dict(
        call_start_id=ids["tool_call_start"],
        call_end_id=ids["tool_call_end"],
        quote_id=ids["string_delimiter"],
    )
    _, accepts = _matcher(tool_call_grammar(TOOLS, **kw))
    good = call("get_weather", f"city:{Q}Oslo{Q},days:3,unit:{Q}c{Q}")
    assert accepts(good) and accepts(good + call("noop", "")) and accepts(call("noop", ""))
    assert not accepts(call("get_weather", f"city:{Q}Oslo{Q},unit:{Q}c{Q}"))  # a required key missing
    assert not accepts(call("get_weather", f"days:3,city:{Q}Oslo{Q},unit:{Q}c{Q}"))  # not in template order
    assert not accepts(call("get_weather", f"city:{Q}Oslo{Q},days:3,unit:{Q}k{Q}"))  # not in the enum
    assert not accepts(call("get_weather", f"city:{Q}Trondheim{Q},days:3,unit:{Q}c{Q}"))  # over maxLength
    assert not accepts(call("other", ""))
    assert not accepts("text " + good)
    _, one = _matcher(tool_call_grammar(TOOLS, **kw, parallel=False))
    assert one(good) and not one(good + call("noop", ""))
    _, named = _matcher(tool_call_grammar(TOOLS, **kw, name="noop"))
    assert named(call("noop", "")) and not named(good)


def test_the_call_grammar_refuses_what_it_cannot_express() -> None:
    kw = dict(call_start_id=1, call_end_id=2, quote_id=3)
    with pytest.raises(ToolSchemaError, match="no tool is named 'x'"):
        tool_call_grammar(TOOLS, **kw, name="x")
    bad = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"properties": {"a": {"type": "date"}}, "required": ["a"]},
            },
        }
    ]
    with pytest.raises(ToolSchemaError, match=r"f.parameters.properties.a: unsupported type 'date'"):
        tool_call_grammar(bad, **kw)


def test_optional_properties_may_be_written_in_template_order() -> None:
    ids, _ = _matcher('start: "x"')
    kw = dict(
        call_start_id=ids["tool_call_start"],
        call_end_id=ids["tool_call_end"],
        quote_id=ids["string_delimiter"],
    )
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "integer"}},
        "required": ["b"],
    }
    _, accepts = _matcher(
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": schema}}], **kw)
    )
    for body in ("b:true", "a:1,b:true", "b:true,c:2", "a:1,b:false,c:3"):
        assert accepts(call("f", body)), body
    for body in ("", "a:1", "b:true,a:1", "a:1,,b:true", ",b:true", "b:true,", "a:1,c:2"):
        assert not accepts(call("f", body)), body


def test_numeric_bounds_are_enforced() -> None:
    ids, _ = _matcher('start: "x"')
    kw = dict(
        call_start_id=ids["tool_call_start"],
        call_end_id=ids["tool_call_end"],
        quote_id=ids["string_delimiter"],
    )
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 3, "maximum": 17},
            "x": {"type": "number", "exclusiveMinimum": -1.5, "maximum": 2},
        },
        "required": ["n", "x"],
    }
    _, accepts = _matcher(
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": schema}}], **kw)
    )
    for body in ("n:3,x:2", "n:17,x:-1.25", "n:10,x:0.5"):
        assert accepts(call("f", body)), body
    for body in ("n:2,x:0", "n:18,x:0", "n:5,x:-1.5", "n:5,x:2.5", "n:5.5,x:0"):
        assert not accepts(call("f", body)), body


@pytest.mark.parametrize(("low", "high"), [(0, 2), (1, 3), (2, 2), (0, None), (2, None), (0, 0)])
def test_array_lengths_are_enforced(low: int, high: int | None) -> None:
    ids, _ = _matcher('start: "x"')
    kw = dict(
        call_start_id=ids["tool_call_start"],
        call_end_id=ids["tool_call_end"],
        quote_id=ids["string_delimiter"],
    )
    items = {"type": "array", "items": {"type": "integer"}, "minItems": low}
    if high is not None:
        items["maxItems"] = high
    schema = {"type": "object", "properties": {"a": items}, "required": ["a"]}
    _, accepts = _matcher(
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": schema}}], **kw)
    )
    for n in range(6):
        body = "a:[" + ",".join(str(i) for i in range(n)) + "]"
        assert accepts(call("f", body)) == (low <= n and (high is None or n <= high)), (n, body)
    assert not accepts(call("f", "a:[1,,2]")) and not accepts(call("f", "a:[,1]"))
