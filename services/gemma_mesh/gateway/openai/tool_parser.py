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

Pure logic (no I/O); mirrors vLLM's ``ToolParser`` streaming contract
(``vllm/entrypoints/openai/tool_parsers``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

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
