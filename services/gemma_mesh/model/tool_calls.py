"""Gemma 4's native tool calls in streamed text -> OpenAI ``tool_calls``.

Gemma 4 writes a call as ``<|tool_call>call:NAME{key:value,...}<tool_call|>`` (its chat template's
``format_call``): keys unquoted, strings between ``<|"|>`` markers, numbers, ``true``/``false``/
``null``, nested ``{...}`` and ``[...]``; several calls may follow each other, with text before and
after. ``Gemma4ToolParser`` takes the answer text as it streams (markers included: the decoder
keeps them when asked) and returns the text outside calls as content and each call, once its end
marker arrives, as OpenAI stream deltas: the id and name first, then the JSON ``arguments``.

Malformed calls that real models write (listed in vLLM's, llama.cpp's and Ollama's Gemma issues)
are repaired where the intent is unambiguous: ``call:f(...)`` parentheses, a missing ``call:``
prefix, missing closing braces or no argument block, JSON-quoted strings and keys, stray Markdown
backticks around a call. A call that still does not parse is returned as content with the markers
removed, so a client never sees a control token and the server never fails on model output.

``tool_call_grammar`` writes the Lark grammar (llguidance's dialect) that forces calls in this
syntax with arguments matching the tools' JSON schemas: ``tool_choice`` ``required`` or a named
function, as vLLM constrains them with its structured-output backend.

Pure logic (no I/O); the parser mirrors vLLM's ``ToolParser`` streaming contract
(``vllm/entrypoints/openai/tool_parsers``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$")
_BARE_END = set("{}[](),:")
# A Markdown fence (or one backtick) right before a call, and the one closing it right after.
_FENCE_BEFORE = re.compile(r"(```[A-Za-z_]*\s*|`)$")
_FENCE_AFTER = re.compile(r"^\s*(```|`)")
# What may still become a fence before a call: held back until the next text decides.
_FENCE_HELD = re.compile(r"`{1,3}[A-Za-z_]*\s*$")


@dataclass
class ToolCall:
    """One parsed call: ``arguments`` is a JSON object's text."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """One OpenAI stream delta of call ``index``: the first carries ``id`` and ``name``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    """What a piece of text added: content outside calls, and call deltas."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class MalformedCall(ValueError):
    """The text of a call cannot be read as one."""


def new_call_id() -> str:
    """An OpenAI-style call id (``call_`` + 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class _Reader:
    """Recursive-descent reader of Gemma's argument syntax into Python values (repairing)."""

    def __init__(self, text: str, quote: str) -> None:
        self.text = text
        self.quote = quote
        self.pos = 0

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip()
        return self.pos >= len(self.text)

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self) -> object:
        self.skip()
        if self.text.startswith(self.quote, self.pos):
            end = self.text.find(self.quote, self.pos + len(self.quote))
            if end < 0:
                raise MalformedCall("an unterminated string")
            out = self.text[self.pos + len(self.quote) : end]
            self.pos = end + len(self.quote)
            return out
        char = self.peek()
        if char == '"':
            try:
                out, end = json.JSONDecoder().raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                raise MalformedCall(f"a bad JSON string: {exc}") from None
            self.pos = end
            return out
        if char in "{(":
            return self.mapping()
        if char == "[":
            return self.sequence()
        return self.bare()

    def bare(self) -> object:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _BARE_END:
            if self.text.startswith(self.quote, self.pos):
                break
            self.pos += 1
        word = self.text[start : self.pos].strip()
        if not word:
            raise MalformedCall(f"a value expected at {start}")
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        if _NUMBER.match(word):
            return json.loads(word)
        raise MalformedCall(f"an unquoted value {word!r}")

    def key(self) -> str:
        self.skip()
        if self.text.startswith(self.quote, self.pos) or self.peek() == '"':
            key = self.value()
            assert isinstance(key, str)
            return key
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise MalformedCall(f"a key expected at {self.pos}")
        self.pos = match.end()
        return match.group()

    def mapping(self) -> dict:
        close = "}" if self.text[self.pos] == "{" else ")"
        self.pos += 1
        out: dict = {}
        while True:
            char = self.peek()
            if char == close or char == "":  # a missing closing brace at the end is repaired
                self.pos += 1 if char else 0
                return out
            if out:
                if char != ",":
                    raise MalformedCall(f"',' or {close!r} expected at {self.pos}")
                self.pos += 1
                if self.peek() == close:  # a trailing comma
                    continue
            key = self.key()
            if self.peek() not in (":", "="):
                raise MalformedCall(f"':' expected after {key!r}")
            self.pos += 1
            out[key] = self.value()

    def sequence(self) -> list:
        self.pos += 1
        out: list = []
        while True:
            char = self.peek()
            if char in ("]", ""):
                self.pos += 1 if char else 0
                return out
            if out:
                if char != ",":
                    raise MalformedCall(f"',' or ']' expected at {self.pos}")
                self.pos += 1
                if self.peek() == "]":
                    continue
            out.append(self.value())


def parse_call(body: str, quote: str = '<|"|>') -> tuple[str, dict]:
    """The name and arguments of one call's text (between the markers): ``call:NAME{...}``.

    Raises:
        MalformedCall: no name, or arguments that cannot be read even with the repairs.
    """
    text = body.strip().strip("`").strip()
    text = text.removeprefix("call:").lstrip()
    match = _NAME.match(text)
    if not match:
        raise MalformedCall("no function name")
    name = match.group()
    reader = _Reader(text[match.end() :], quote)
    if reader.at_end():
        return name, {}
    if reader.peek() not in "{(":
        # Arguments without braces: ``call:f a:1, b:2`` -> read them as if braced.
        reader = _Reader("{" + text[match.end() :] + "}", quote)
    args = reader.mapping()
    if not reader.at_end():
        raise MalformedCall(f"text after the arguments: {reader.text[reader.pos :]!r}")
    return name, args


class Gemma4ToolParser:
    """Streaming parser of one answer (``feed`` each text delta, then ``finish``).

    Args:
        call_start / call_end / quote: the markers' text, from the bundle's special tokens
            (``<|tool_call>``, ``<tool_call|>``, ``<|"|>`` on Gemma 4).
    """

    def __init__(self, call_start: str, call_end: str, quote: str) -> None:
        self.start, self.end, self.quote = call_start, call_end, quote
        self._buffer = ""
        self._in_call = False
        self._after_call = False  # drop a closing fence's backticks right after a call
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> ParsedDelta:
        """Consume a text delta; returns the content and call deltas it completes."""
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> ParsedDelta:
        """End of the answer: text held back is released; an unclosed call is parsed if it can
        be, else returned as content."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        while True:
            if self._in_call:
                at = self._buffer.find(self.end)
                if at < 0 and not final:
                    return out
                body = self._buffer if at < 0 else self._buffer[:at]
                self._buffer = "" if at < 0 else self._buffer[at + len(self.end) :]
                self._in_call = False
                self._close_call(body, out)
                self._after_call = True
                if at < 0:
                    return out
                continue
            if self._after_call:
                if not self._buffer.lstrip().lstrip("`") and not final:
                    return out  # a closing fence may still come
                fence = _FENCE_AFTER.match(self._buffer)
                if fence:
                    self._buffer = self._buffer[fence.end() :]
                self._after_call = False
            at = self._buffer.find(self.start)
            if at >= 0:
                # Backticks right before a call are a stray Markdown fence: dropped.
                before = self._buffer[:at]
                fence = _FENCE_BEFORE.search(before)
                out.content += self._visible(before[: fence.start()] if fence else before)
                self._buffer = self._buffer[at + len(self.start) :]
                self._in_call = True
                continue
            keep = 0 if final else self._held_suffix()
            out.content += self._visible(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return out

    def _held_suffix(self) -> int:
        """Characters at the end that may begin a marker, and the backticks before them (a fence
        that is dropped if a call follows)."""
        buffer = self._buffer
        partial = 0
        for marker in (self.start, self.end, self.quote):
            for n in range(min(len(marker) - 1, len(buffer)), partial, -1):
                if buffer.endswith(marker[:n]):
                    partial = n
                    break
        rest = buffer[: len(buffer) - partial]
        fence = _FENCE_HELD.search(rest)
        return partial + (len(rest) - fence.start() if fence else 0)

    def _close_call(self, body: str, out: ParsedDelta) -> None:
        try:
            name, args = parse_call(body, self.quote)
        except MalformedCall:
            out.content += self._visible(body)
            return
        call = ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))
        index = len(self.calls)
        self.calls.append(call)
        out.tool_calls.append(ToolCallDelta(index, id=call.id, name=name))
        out.tool_calls.append(ToolCallDelta(index, arguments=call.arguments))

    def _visible(self, text: str) -> str:
        """``text`` without control markers (string markers become quotes)."""
        return text.replace(self.quote, '"').replace(self.start, "").replace(self.end, "")


# --- the grammar of forced calls ------------------------------------------------------------


class ToolSchemaError(ValueError):
    """A tool's parameter schema uses something the call grammar cannot express."""


_LARK_COMMON = r"""
gval: gstr | NUMBER | "true" | "false" | "null" | gobj | garr
gobj: "{{" (gkey ":" gval ("," gkey ":" gval)*)? "}}"
garr: "[" (gval ("," gval)*)? "]"
gkey: KEY
gstr: {q} STRBODY {q}
KEY: /[A-Za-z_][A-Za-z0-9_]*/
STRBODY: /[^<]*/
NUMBER: /-?(0|[1-9][0-9]{{0,15}})(\.[0-9]{{1,16}})?([eE][+-]?[0-9]{{1,3}})?/
INTEGER: /-?(0|[1-9][0-9]{{0,15}})/
"""


MAX_BOUNDED_ITEMS = 32  # maxItems written into the grammar item by item; larger ones are not enforced
_NUMERIC_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


class _GrammarWriter:
    """JSON schema -> Lark rules for Gemma's argument syntax (keys sorted as the template writes them)."""

    def __init__(self, quote: str) -> None:
        self.quote = quote
        self.rules: list[str] = []
        self._count = 0

    def rule(self, body: str) -> str:
        self._count += 1
        name = f"r{self._count}"
        self.rules.append(f"{name}: {body}")
        return name

    def string_literal(self, text: str) -> str:
        return f"{self.quote} {json.dumps(text)} {self.quote}"

    def value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            return "gval"
        if not isinstance(schema, Mapping):
            raise ToolSchemaError(f"{where}: a schema must be an object")
        if "enum" in schema or "const" in schema:
            options = schema["enum"] if "enum" in schema else [schema["const"]]
            return self.rule(" | ".join(self.literal(v, where) for v in options) or '""')
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [self.value(s, f"{where}.{key}[{i}]") for i, s in enumerate(schema[key])]
                return self.rule(" | ".join(options))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value({**schema, "type": k}, where) for k in kind))
        if kind == "string":
            pattern = schema.get("pattern")
            if pattern:
                body = pattern.removeprefix("^").removesuffix("$")
                regex = body.replace("/", "\\/")
                return self.rule(f"{self.quote} /{regex}/ {self.quote}")
            low, high = schema.get("minLength"), schema.get("maxLength")
            if isinstance(low, int) or isinstance(high, int):
                return self.rule(
                    f"{self.quote} /[^<]{{{low or 0},{high if isinstance(high, int) else ''}}}/ {self.quote}"
                )
            return "gstr"
        if kind in ("integer", "number"):
            bounds = {k: schema[k] for k in _NUMERIC_KEYWORDS if k in schema}
            if bounds:  # numbers are written as JSON writes them: llguidance's JSON compiler bounds them
                return self.rule(f"%json {json.dumps({'type': kind, **bounds})}")
            return "INTEGER" if kind == "integer" else "NUMBER"
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return self.rule('"null"')
        if kind == "array":
            item = self.value(schema.get("items", True), f"{where}.items")
            return self.rule(self.array_body(item, schema.get("minItems", 0), schema.get("maxItems")))
        if kind == "object" or "properties" in schema:
            return self.rule(self.object_body(schema, where))
        if kind is None:
            return "gval"
        raise ToolSchemaError(f"{where}: unsupported type {kind!r}")

    def object_body(self, schema: Mapping[str, Any], where: str) -> str:
        """``{key:value,...}``: the properties in sorted order (as the template's ``dictsort``), the
        required ones always, the optional ones at will; without properties, any object.

        Commas go only between written pairs: ``first_i`` is the rest of the object from key ``i``
        on when nothing was written yet, ``after_i`` the same after a written pair (one rule each,
        so the grammar grows linearly with the properties)."""
        properties = schema.get("properties")
        if not properties:
            return "gobj"
        required = set(schema.get("required", []))
        keys = sorted(properties)
        pairs = [
            f"{json.dumps(key + ':')} {self.value(properties[key], f'{where}.properties.{key}')}"
            for key in keys
        ]
        first, after = '""', '""'  # past the last key
        for key, pair in zip(reversed(keys), reversed(pairs), strict=True):
            if key in required:
                first, after = self.rule(f"{pair} {after}"), self.rule(f'"," {pair} {after}')
            else:
                first = self.rule(f"{pair} {after} | {first}")
                after = self.rule(f'"," {pair} {after} | {after}')
        return f'"{{" {first} "}}"'

    def array_body(self, item: str, low: int, high: int | None) -> str:
        """``[item,...]`` with ``low`` to ``high`` items (None = no limit); each optional item past
        ``low`` nests in the one before, so commas go only between items."""
        if high is not None and high < low:
            raise ToolSchemaError(f"maxItems {high} < minItems {low}")
        if high is not None and high > MAX_BOUNDED_ITEMS:
            high = None  # a long bound is not worth its rules: only the minimum is kept
        tail = f'("," {item})*' if high is None else ""
        # Items after the first written one (the first is the one in front of the tail).
        for _ in range(high - max(low, 1) if high is not None else 0):
            tail = f'("," {item} {tail})?'
        if low == 0:
            return f'"[" ({item} {tail})? "]"' if high != 0 else '"[" "]"'
        return '"[" ' + ' "," '.join([item] * low) + f' {tail} "]"'

    def literal(self, value: Any, where: str) -> str:
        if isinstance(value, str):
            return self.string_literal(value)
        if isinstance(value, bool) or value is None or isinstance(value, int | float):
            return json.dumps(json.dumps(value))
        raise ToolSchemaError(f"{where}: enum values must be strings, numbers, booleans or null")


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    call_start_id: int,
    call_end_id: int,
    quote_id: int,
    name: str | None = None,
    parallel: bool = True,
) -> str:
    """A Lark grammar (llguidance dialect) whose sentences are Gemma 4 calls of ``tools``
    (OpenAI ``{"type": "function", "function": {"name", "parameters"}}``): one call of ``name``
    when given, else one or more calls (one when not ``parallel``) of any tool. The markers are
    special tokens, written by id (``<[id]>``) from the bundle.

    Raises:
        ToolSchemaError: no tools, ``name`` not among them, or a parameter schema the grammar
            cannot express (the message names the tool and the schema path).
    """
    functions = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ToolSchemaError(f"tools[{i}]: a function with a name is required")
        functions[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
    if name is not None and name not in functions:
        raise ToolSchemaError(f"no tool is named {name!r}")
    if not functions:
        raise ToolSchemaError("no tools to call")
    writer = _GrammarWriter(f"<[{quote_id}]>")
    options = []
    for fn_name, params in functions.items():
        if name is not None and fn_name != name:
            continue
        where = f"{fn_name}.parameters"
        if not isinstance(params, Mapping):
            raise ToolSchemaError(f"{where}: a schema must be an object")
        body = writer.object_body(params, where) if params.get("properties") else '"{" "}"'
        options.append(f"{json.dumps('call:' + fn_name)} {body}")
    call = f"<[{call_start_id}]> ({' | '.join(options)}) <[{call_end_id}]>"
    start = "call+" if parallel and name is None else "call"
    return "\n".join(
        [f"start: {start}", f"call: {call}", *writer.rules, _LARK_COMMON.format(q=f"<[{quote_id}]>")]
    )
