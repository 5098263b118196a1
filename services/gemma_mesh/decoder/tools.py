"""Tool calling in the decoder: the request's tools and tool history, forced calls, parsed calls.

- ``parse_tools`` reads ``GenerateRequest.tools_json``/``tool_choice``/``parallel_tool_calls``
  into a ``ToolPlan``: the tools the chat template renders, and for ``required`` or a named
  function the Lark grammar (``model.tool_calls.tool_call_grammar``) that forces the calls, their
  names and their arguments' schemas (compiled and masked like any constraint).
- ``message_extras`` reads a message's ``tool_calls_json``/``tool_call_id``/``name`` for the
  prompt builder (the template renders calls and results as Gemma 4 does).
- ``ToolCallStream`` turns the answer's text (tool-call markers kept) into content and OpenAI
  call deltas (``model.tool_calls.Gemma4ToolParser``), keeping only the first call when parallel
  calls are off.

Errors are ``InvalidRequest`` naming the request field (INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.manifest import Manifest
from gemma_mesh.model.tool_calls import Gemma4ToolParser, ParsedDelta, ToolSchemaError, tool_call_grammar
from gemma_mesh.proto.v1 import decoder_pb2

# The special tokens of Gemma 4's call syntax, by manifest name.
MARKERS = ("tool_call_start", "tool_call_end", "string_delimiter")


@dataclass
class ToolPlan:
    """What a request's tools mean for the prompt and the generation."""

    tools: list[dict[str, Any]] | None = None  # rendered in the prompt (None: no tools)
    grammar: str = ""  # Lark grammar forcing the calls ("" = the model decides)
    parallel: bool = True
    parse: bool = False  # keep the markers and parse calls out of the answer


def _json(text: str, param: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, kind):
        raise InvalidRequest(f"{param} must be a JSON {kind.__name__}", param=param)
    return value


def parse_tools(pb: decoder_pb2.GenerateRequest, manifest: Manifest) -> ToolPlan:
    """The request's ``ToolPlan``.

    Raises:
        InvalidRequest: tools that are not a JSON array of named functions, a ``tool_choice``
            naming no tool, a forced choice without tools or together with ``constraint``, a
            vocabulary without the call markers, a parameter schema the grammar cannot express.
    """
    choice = pb.tool_choice or "auto"
    parallel = pb.parallel_tool_calls if pb.HasField("parallel_tool_calls") else True
    if not pb.tools_json:
        if choice not in ("auto", "none"):
            raise InvalidRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return ToolPlan()
    tools = _json(pb.tools_json, "tools_json", list)
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(
                f"tools_json[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                param="tools_json",
            )
    if choice == "none":
        return ToolPlan()
    missing = [name for name in MARKERS if name not in manifest.special_tokens]
    if missing:
        raise InvalidRequest(f"this model has no tool-call tokens ({', '.join(missing)})", param="tools_json")
    plan = ToolPlan(tools=tools, parallel=parallel, parse=True)
    if choice == "auto":
        return plan
    if pb.HasField("constraint"):
        raise InvalidRequest("a forced tool_choice cannot be combined with a constraint", param="tool_choice")
    ids = {name: manifest.token_id(name) for name in MARKERS}
    try:
        plan.grammar = tool_call_grammar(
            tools,
            call_start_id=ids["tool_call_start"],
            call_end_id=ids["tool_call_end"],
            quote_id=ids["string_delimiter"],
            name=None if choice == "required" else choice,
            parallel=parallel,
        )
    except ToolSchemaError as exc:
        param = "tool_choice" if "no tool is named" in str(exc) else "tools_json"
        raise InvalidRequest(f"{param}: {exc}", param=param) from None
    return plan


def message_extras(msg: decoder_pb2.Message, where: str) -> dict[str, Any]:
    """A message's tool fields for the prompt builder (``tool_calls``, ``tool_call_id``, ``name``).

    Raises:
        InvalidRequest: ``tool_calls_json`` that is not a JSON array.
    """
    extras: dict[str, Any] = {}
    if msg.tool_calls_json:
        extras["tool_calls"] = _json(msg.tool_calls_json, f"{where}.tool_calls_json", list)
    if msg.tool_call_id:
        extras["tool_call_id"] = msg.tool_call_id
    if msg.name:
        extras["name"] = msg.name
    return extras


@dataclass
class ToolCallStream:
    """One answer's calls: ``feed`` answer text, ``finish`` at the end; ``made`` counts the calls
    kept (with parallel calls off, calls after the first are dropped)."""

    manifest: Manifest
    parallel: bool = True
    made: int = 0
    _parser: Gemma4ToolParser = field(init=False)

    def __post_init__(self) -> None:
        tokens = self.manifest.special_tokens
        self._parser = Gemma4ToolParser(*(tokens[name].text for name in MARKERS))

    def feed(self, text: str) -> tuple[str, list[decoder_pb2.ToolCallDelta]]:
        return self._keep(self._parser.feed(text))

    def finish(self) -> tuple[str, list[decoder_pb2.ToolCallDelta]]:
        return self._keep(self._parser.finish())

    def _keep(self, parsed: ParsedDelta) -> tuple[str, list[decoder_pb2.ToolCallDelta]]:
        out = []
        for delta in parsed.tool_calls:
            if not self.parallel and delta.index > 0:
                continue
            if delta.name is not None:
                self.made += 1
            out.append(
                decoder_pb2.ToolCallDelta(
                    index=delta.index, id=delta.id or "", name=delta.name or "", arguments=delta.arguments
                )
            )
        return parsed.content, out
