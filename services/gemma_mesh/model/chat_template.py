"""Render a checkpoint's Jinja chat template the way transformers 5.23's ``apply_chat_template`` does.

No torch, no transformers. This mirrors ``transformers.utils.chat_template_utils``:

- the environment (``_cached_compile_jinja_template``): ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks=True``, ``lstrip_blocks=True`` and the ``loopcontrols`` extension; the ``tojson``
  filter that does not escape HTML; the globals ``raise_exception``, ``strftime_now``, ``dict`` and a
  ``namespace`` that refuses underscore-prefixed attributes; a no-op ``{% generation %}`` block;
- the inputs (``apply_chat_template`` and ``render_jinja_template``): message keys whose value is
  ``None`` are dropped, everything is rebuilt from plain JSON types (other objects become
  ``"<TypeName>"``), a message's reasoning is copied to ``thinking`` and ``reasoning_content``;
- the variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's
  named special tokens (``bos_token``, ``eos_token``, ..., and model-specific ones such as
  ``image_token``), then any extra keyword (``enable_thinking``, ...), which overrides them.

``tokenizer.apply_chat_template(..., tokenize=False)`` and ``processor.apply_chat_template`` both
render this way; both tokenize the result with ``add_special_tokens=False`` when it starts with BOS.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "STANDARD_SPECIAL_TOKEN_KEYS",
    "TemplateError",
    "compile_chat_template",
    "render_chat_template",
    "special_tokens_from_config",
]

# transformers' ``PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES``, in its order.
STANDARD_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Names under which a message's reasoning arrives; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` and renders its body unchanged.

    transformers uses the block to compute assistant masks; rendering is unaffected by it.
    """

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """The ``dict`` global: builds dicts without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` that rejects underscore-prefixed attributes, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` in an environment configured like transformers' (cached per template text)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, as transformers' ``_plain_template_data`` does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def special_tokens_from_config(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The template variables transformers 5.23 takes from ``tokenizer.special_tokens_map``.

    Args:
        tokenizer_config: the parsed ``tokenizer_config.json``.

    Returns:
        ``{"bos_token": "<bos>", ..., "image_token": "<|image|>", ...}``: the standard named tokens
        (``bos/eos/unk/sep/pad/cls/mask_token``) that are set, then the model-specific named tokens
        (any other string-valued ``*_token`` key, and the entries of a dict ``extra_special_tokens``
        or ``model_specific_special_tokens``, as written by transformers' ``save_pretrained``).
        Values saved as AddedToken dicts are reduced to their ``content``. ``<|video|>``, which the
        Gemma 4 processor adds as an unnamed extra token, is not a template variable.
    """

    def content(value: Any) -> str | None:
        if isinstance(value, Mapping):
            value = value.get("content")
        return value if isinstance(value, str) else None

    tokens: dict[str, str] = {}
    for key in STANDARD_SPECIAL_TOKEN_KEYS:
        if (value := content(tokenizer_config.get(key))) is not None:
            tokens[key] = value
    for key, raw in tokenizer_config.items():
        if key in tokens or key in STANDARD_SPECIAL_TOKEN_KEYS or not key.endswith("_token"):
            continue
        if isinstance(raw, str) or (isinstance(raw, Mapping) and "content" in raw):
            if (value := content(raw)) is not None:
                tokens[key] = value
    for group in ("extra_special_tokens", "model_specific_special_tokens"):
        if isinstance(named := tokenizer_config.get(group), Mapping):  # a list holds unnamed tokens
            for key, raw in named.items():
                if (value := content(raw)) is not None:
                    tokens[key] = value
    return tokens


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    special_tokens: Mapping[str, str],
    documents: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` with ``template`` exactly as transformers 5.23's ``apply_chat_template``.

    Equivalent to ``tokenizer.apply_chat_template(messages, tools=tools, documents=documents,
    add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, tokenize=False,
    **extra)`` for a single conversation (no ``continue_final_message``, no assistant masks).

    Args:
        template: the chat template source (``chat_template.jinja``).
        messages: one conversation, each message a mapping with ``role`` and usually ``content``.
        tools: JSON-schema tool declarations (mappings; Python callables are not accepted here).
        add_generation_prompt: end with the header of a new model turn.
        enable_thinking: passed to the template as ``enable_thinking``.
        special_tokens: the template variables for the named special tokens, e.g. from
            :func:`special_tokens_from_config`.
        documents: passed to the template as ``documents`` (RAG templates).
        **extra: further template variables; they override ``special_tokens`` on a name clash.

    Returns:
        The rendered prompt text, BOS included when the template writes it.

    Raises:
        jinja2.exceptions.TemplateError: the template rejected the conversation
            (``raise_exception``) or failed to render.
        TypeError: a message or document is not a mapping, or a tool is not a mapping.
    """
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"Chat messages should be mappings, but got {message!r}.")
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise TypeError("Tools should be JSON-schema mappings.")
    if documents is not None and not all(isinstance(doc, Mapping) for doc in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
    chat = [_alias_reasoning(message) for message in _plain(chat)]
    variables = _plain({**special_tokens, "enable_thinking": enable_thinking, **extra})
    compiled = compile_chat_template(template)
    return compiled.render(
        messages=chat,
        tools=_plain(list(tools)) if tools is not None else None,
        documents=_plain(list(documents)) if documents is not None else None,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
