"""Messages + soft-token counts -> Gemma 4 prompt token ids, without torch or transformers.

``PromptBuilder.build`` gives the ids that transformers 5.23's ``Gemma4Processor.apply_chat_template(
messages, tokenize=True, ...)`` gives for the same conversation and media:

1. render the checkpoint's chat template (:mod:`gemma_mesh.model.chat_template`), which writes one
   placeholder per media part: ``<|image|>``, ``<|audio|>``, ``<|video|>``;
2. expand the placeholders in order, as ``Gemma4Processor.replace_*_token`` do:
   image ``boi + image * n + eoi``; audio ``boa + audio * n + eoa``; video, per frame,
   ``"mm:ss " + boi + video * n + eoi``, frames joined by ``" "`` (video frames use the image
   delimiters);
3. encode the expanded text once with ``tokenizer.json``, without special tokens when it starts
   with BOS (as the processor does; otherwise with the tokenizer's post-processor).

Token strings come from ``token_map`` (role name -> id, from the bundle manifest) through the
tokenizer's vocabulary; template variables (``bos_token`` ...) from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.chat_template import (
    STANDARD_SPECIAL_TOKEN_KEYS,
    TemplateError,
    render_chat_template,
    special_tokens_from_config,
)

__all__ = ["MediaKind", "MediaSpan", "Prompt", "PromptBuilder"]

MediaKind = Literal["image", "audio", "video"]
MEDIA_KINDS: tuple[MediaKind, ...] = ("image", "audio", "video")
ROLES = frozenset({"system", "user", "assistant", "model", "tool"})
# token_map keys the builder needs: the three placeholders and the image/audio delimiters.
REQUIRED_TOKENS = ("image", "audio", "video", "boi", "eoi", "boa", "eoa")


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's soft tokens sit in ``Prompt.input_ids``.

    Attributes:
        kind: "image", "audio" or "video".
        index: the item's index among the items of its kind, in prompt order (the index into
            ``image_soft_tokens`` / ``audio_soft_tokens`` / ``video_frames``).
        frame: the frame index within the video; 0 for images and audio.
        start: position of the first soft token.
        length: number of soft tokens (consecutive placeholder ids ``start .. start + length - 1``).
    """

    kind: MediaKind
    index: int
    frame: int
    start: int
    length: int


@dataclass(frozen=True, eq=False)
class Prompt:
    """A tokenized prompt.

    Attributes:
        text: the expanded prompt text; ``input_ids`` is its encoding.
        rendered: the chat template's output, before placeholder expansion.
        input_ids: int64 ``[seq]``, as ``Gemma4Processor.apply_chat_template(..., tokenize=True)``.
        spans: every media item's (every video frame's) soft-token run, in prompt order.
    """

    text: str
    rendered: str
    input_ids: np.ndarray
    spans: tuple[MediaSpan, ...]

    def counts(self, kind: MediaKind) -> list[int]:
        """Soft tokens per item of ``kind`` (per frame for video), in prompt order."""
        return [span.length for span in self.spans if span.kind == kind]

    def positions(self, kind: MediaKind) -> np.ndarray:
        """int64 ``[n]``: positions of all ``kind`` placeholder tokens, in order.

        Row ``i`` of the concatenated soft tokens of that kind goes to ``input_ids[positions[i]]``.
        """
        runs = [np.arange(s.start, s.start + s.length, dtype=np.int64) for s in self.spans if s.kind == kind]
        return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)


def _timestamp(seconds: float) -> str:
    # Gemma4Processor.replace_video_token: f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _positive_count(value: Any, what: str, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise InvalidRequest(f"{what} must be a positive number of soft tokens, got {value!r}", param=param)
    return int(value)


class PromptBuilder:
    """Builds Gemma 4 prompts from OpenAI-like messages and per-media soft-token counts.

    Args:
        tokenizer: the checkpoint's ``tokenizer.json``.
        chat_template: the checkpoint's chat template source.
        token_map: special-token ids by role name; must hold ``image, audio, video, boi, eoi, boa,
            eoa`` (placeholders and delimiters) and should hold ``bos``.
        special_tokens: the template variables for named special tokens (``bos_token``,
            ``image_token``, ...), as :func:`~gemma_mesh.model.chat_template.special_tokens_from_config`
            reads them from ``tokenizer_config.json``. Default: the standard names
            (``pad/eos/bos/unk/mask_token``) whose roles are in ``token_map``.

    Raises:
        ValueError: a required role is missing, an id is not in the vocabulary, or a placeholder,
            delimiter or BOS id is not an added special token.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        token_map: Mapping[str, int],
        *,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        missing = [role for role in REQUIRED_TOKENS if role not in token_map]
        if missing:
            raise ValueError(f"token_map lacks {missing}")
        self._tokenizer = tokenizer
        self._template = chat_template
        self._strings: dict[str, str] = {}
        added = tokenizer.get_added_tokens_decoder()
        for role, token_id in token_map.items():
            token = tokenizer.id_to_token(int(token_id))
            if token is None:
                raise ValueError(f"token_map[{role!r}] = {token_id} is not in the vocabulary")
            strict = role in REQUIRED_TOKENS or role == "bos"
            if strict and (int(token_id) not in added or not added[int(token_id)].special):
                raise ValueError(f"token_map[{role!r}] = {token_id} ({token!r}) is not a special token")
            self._strings[role] = token
        self._ids = {role: int(token_id) for role, token_id in token_map.items()}
        if special_tokens is None:
            special_tokens = {
                key: self._strings[key.removesuffix("_token")]
                for key in STANDARD_SPECIAL_TOKEN_KEYS
                if key.removesuffix("_token") in self._strings
            }
        self._special_tokens = dict(special_tokens)
        self._placeholder_re = re.compile("|".join(re.escape(self._strings[kind]) for kind in MEDIA_KINDS))
        # Control tokens (turn markers, placeholders, ...) are the template's to write: user, system or
        # tool text that contains one could forge a turn, so it is refused (transformers honours it).
        control = sorted((t.content for t in added.values() if t.special), key=len, reverse=True)
        self._control_re = re.compile("|".join(re.escape(t) for t in control)) if control else None
        self._kind_of = {self._strings[kind]: kind for kind in MEDIA_KINDS}

    @classmethod
    def from_dir(cls, directory: str | Path, token_map: Mapping[str, int]) -> PromptBuilder:
        """Load ``tokenizer.json``, ``chat_template.jinja`` and (if present) ``tokenizer_config.json``.

        The template may instead be the ``chat_template`` entry of ``tokenizer_config.json``.
        """
        directory = Path(directory)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_path = directory / "chat_template.jinja"
        if template_path.is_file():
            template = template_path.read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        else:
            raise FileNotFoundError(f"no chat template in {directory}")
        special = special_tokens_from_config(config) if config else None
        return cls(tokenizer, template, token_map, special_tokens=special)

    @property
    def token_strings(self) -> dict[str, str]:
        """Token string by role name, for every role in ``token_map``."""
        return dict(self._strings)

    def build(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        image_soft_tokens: Sequence[int] = (),
        audio_soft_tokens: Sequence[int] = (),
        video_frames: Sequence[Sequence[tuple[float, int]]] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> Prompt:
        """Render, expand and tokenize one conversation.

        Args:
            messages: dicts with ``role`` in {system, user, assistant, model, tool} and ``content``,
                a string or a list of parts ``{"type": "text", "text": str}``, ``{"type": "image"}``,
                ``{"type": "audio"}``, ``{"type": "video"}`` (other keys of a media part are
                ignored). Assistant messages may carry OpenAI ``tool_calls`` (JSON-string arguments
                are parsed into objects) and need no content then; tool messages may carry
                ``tool_call_id`` or ``name`` and an object as content. Media may only appear in user
                and assistant messages.
            image_soft_tokens: soft tokens per image part, in message order
                (``num_soft_tokens_per_image`` of the image processor).
            audio_soft_tokens: soft tokens per audio part, in message order (the audio encoder's
                valid frames, ``Gemma4Processor._compute_audio_num_tokens``).
            video_frames: per video part, per sampled frame ``(timestamp_s, soft_tokens)``.
            tools: JSON-schema function declarations (OpenAI ``{"type": "function", ...}``).
            enable_thinking: put ``<|think|>`` in the system turn (template variable).
            add_generation_prompt: end with the header of a new model turn.

        Returns:
            The :class:`Prompt`.

        Raises:
            InvalidRequest: empty or malformed messages, an unknown role or part type, media in a
                system or tool message, a number of media parts that differs from the number of
                soft-token counts given, a non-positive count, text that contains media
                placeholder tokens, or a conversation the template rejects.
        """
        chat, n_parts = self._normalize(messages)
        self._refuse_control_tokens(chat)
        replacements = self._replacements(n_parts, image_soft_tokens, audio_soft_tokens, video_frames)
        try:
            rendered = render_chat_template(
                self._template,
                chat,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                special_tokens=self._special_tokens,
            )
        except (TemplateError, TypeError) as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
        for kind in MEDIA_KINDS:
            found = rendered.count(self._strings[kind])
            if found != n_parts[kind]:
                raise InvalidRequest(
                    f"the prompt has {found} {kind} placeholders for {n_parts[kind]} {kind} parts; "
                    f"message text may not contain the token {self._strings[kind]!r}",
                    param="messages",
                )
        order: list[tuple[MediaKind, int, list[int]]] = []  # (kind, item index, run lengths) in prompt order
        used = dict.fromkeys(MEDIA_KINDS, 0)

        def expand(match: re.Match[str]) -> str:
            kind = self._kind_of[match.group()]
            expansion, lengths = replacements[kind][used[kind]]
            order.append((kind, used[kind], lengths))
            used[kind] += 1
            return expansion

        text = self._placeholder_re.sub(expand, rendered)
        bos = self._strings.get("bos")
        add_special = not (bos is not None and text.startswith(bos))
        ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=add_special).ids, dtype=np.int64)
        spans = self._spans(ids, order)
        return Prompt(text=text, rendered=rendered, input_ids=ids, spans=spans)

    # -- helpers ----------------------------------------------------------------------------------

    def _normalize(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], dict[str, int]]:
        """Validate ``messages``; return template-ready copies and the number of parts per media kind."""
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        n_parts = dict.fromkeys(MEDIA_KINDS, 0)
        chat: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            param = f"messages[{i}]"
            if not isinstance(message, Mapping):
                raise InvalidRequest(f"{param} must be an object", param=param)
            role = message.get("role")
            if role not in ROLES:
                raise InvalidRequest(
                    f"{param}.role must be one of {sorted(ROLES)}, got {role!r}", param=param
                )
            if role == "system" and i != 0:
                raise InvalidRequest("only the first message may be a system message", param=param)
            out = dict(message)
            content = message.get("content")
            if content is None:
                if role not in ("assistant", "model") or not message.get("tool_calls"):
                    raise InvalidRequest(f"{param}.content is required", param=f"{param}.content")
            elif (
                not isinstance(content, str)
                and isinstance(content, Sequence)
                and not isinstance(content, bytes)
            ):
                out["content"] = [
                    self._part(part, role, f"{param}.content[{j}]", n_parts) for j, part in enumerate(content)
                ]
            elif not isinstance(content, str) and not (role == "tool" and isinstance(content, Mapping)):
                raise InvalidRequest(f"{param}.content must be a string or a list of parts", param=param)
            if message.get("tool_calls") is not None:
                out["tool_calls"] = self._tool_calls(message["tool_calls"], role, f"{param}.tool_calls")
            chat.append(out)
        return chat, n_parts

    def _refuse_control_tokens(self, chat: list[dict[str, Any]]) -> None:
        if self._control_re is None:
            return
        for i, message in enumerate(chat):
            if message.get("role") in ("assistant", "model"):
                continue  # model turns may carry thought channels; the template strips them
            content = message.get("content")
            texts = (
                [content]
                if isinstance(content, str)
                else [
                    p.get("text")
                    for p in content or ()
                    if isinstance(p, Mapping) and isinstance(p.get("text"), str)
                ]
                if isinstance(content, list)
                else []
            )
            for text in texts:
                found = self._control_re.search(text or "")
                if found:
                    raise InvalidRequest(
                        f"messages[{i}] contains the control token {found.group()!r}; message text may not "
                        "contain special tokens",
                        param=f"messages[{i}].content",
                    )

    @staticmethod
    def _part(part: Any, role: str, param: str, n_parts: dict[str, int]) -> dict[str, Any]:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{param}.text must be a string", param=param)
            return {"type": "text", "text": part["text"]}
        if kind in MEDIA_KINDS:
            if role in ("system", "tool"):
                raise InvalidRequest(f"{param}: {role} messages may only contain text", param=param)
            n_parts[kind] += 1
            return {"type": kind}
        raise InvalidRequest(
            f"{param}.type must be one of ['text', 'image', 'audio', 'video'], got {kind!r}", param=param
        )

    @staticmethod
    def _tool_calls(calls: Any, role: str, param: str) -> list[dict[str, Any]]:
        if role not in ("assistant", "model"):
            raise InvalidRequest(f"{param}: only assistant messages make tool calls", param=param)
        if isinstance(calls, str | bytes | Mapping) or not isinstance(calls, Sequence):
            raise InvalidRequest(f"{param} must be a list", param=param)
        out = []
        for j, call in enumerate(calls):
            fn = call.get("function", call) if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise InvalidRequest(f"{param}[{j}] needs a function name", param=param)
            arguments = fn.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError as exc:
                    raise InvalidRequest(
                        f"{param}[{j}].arguments is not valid JSON: {exc}", param=param
                    ) from exc
                if not isinstance(arguments, Mapping):
                    raise InvalidRequest(f"{param}[{j}].arguments must be a JSON object", param=param)
                fn = {**fn, "arguments": arguments}
                call = {**call, "function": fn} if "function" in call else fn
            out.append(dict(call))
        return out

    def _replacements(
        self,
        n_parts: Mapping[str, int],
        image_soft_tokens: Sequence[int],
        audio_soft_tokens: Sequence[int],
        video_frames: Sequence[Sequence[tuple[float, int]]],
    ) -> dict[str, list[tuple[str, list[int]]]]:
        """Per kind, per item: the expansion text and the soft-token run lengths it contains."""
        given = {"image": image_soft_tokens, "audio": audio_soft_tokens, "video": video_frames}
        for kind in MEDIA_KINDS:
            if len(given[kind]) != n_parts[kind]:
                more = "media parts than soft-token counts" if n_parts[kind] > len(given[kind]) else None
                raise InvalidRequest(
                    f"more {kind} {more or 'soft-token counts than media parts'}: "
                    f"{n_parts[kind]} {kind} parts, {len(given[kind])} counts given",
                    param=f"{kind}_soft_tokens" if kind != "video" else "video_frames",
                )
        s = self._strings
        out: dict[str, list[tuple[str, list[int]]]] = {kind: [] for kind in MEDIA_KINDS}
        for i, count in enumerate(image_soft_tokens):
            n = _positive_count(count, f"image_soft_tokens[{i}]", "image_soft_tokens")
            out["image"].append((s["boi"] + s["image"] * n + s["eoi"], [n]))
        for i, count in enumerate(audio_soft_tokens):
            n = _positive_count(count, f"audio_soft_tokens[{i}]", "audio_soft_tokens")
            out["audio"].append((s["boa"] + s["audio"] * n + s["eoa"], [n]))
        for i, frames in enumerate(video_frames):
            if isinstance(frames, str | bytes) or not isinstance(frames, Sequence) or not frames:
                raise InvalidRequest(
                    f"video_frames[{i}] must be a non-empty list of frames", param="video_frames"
                )
            pieces, lengths = [], []
            for j, frame in enumerate(frames):
                what = f"video_frames[{i}][{j}]"
                if not isinstance(frame, Sequence) or len(frame) != 2:
                    raise InvalidRequest(f"{what} must be (timestamp_s, soft_tokens)", param="video_frames")
                seconds, count = frame
                if (
                    isinstance(seconds, bool)
                    or not isinstance(seconds, int | float | np.number)
                    or not (math.isfinite(seconds) and seconds >= 0)
                ):
                    raise InvalidRequest(
                        f"{what}: timestamp_s must be a finite number >= 0", param="video_frames"
                    )
                n = _positive_count(count, what, "video_frames")
                pieces.append(f"{_timestamp(float(seconds))} {s['boi']}{s['video'] * n}{s['eoi']}")
                lengths.append(n)
            out["video"].append((" ".join(pieces), lengths))
        return out

    def _spans(self, ids: np.ndarray, order: list[tuple[MediaKind, int, list[int]]]) -> tuple[MediaSpan, ...]:
        """Locate the placeholder runs in ``ids`` and check them against the expansions made."""
        expected = [
            (kind, index, frame, n) for kind, index, lengths in order for frame, n in enumerate(lengths)
        ]
        is_placeholder = np.isin(ids, [self._ids[kind] for kind in MEDIA_KINDS]).astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], is_placeholder, [0]))))
        starts, ends = edges[::2].tolist(), edges[1::2].tolist()
        spans = tuple(
            MediaSpan(kind, index, frame, start, end - start)
            for (kind, index, frame, _), start, end in zip(expected, starts, ends, strict=False)
        )
        if len(starts) != len(expected) or any(
            span.length != n or np.any(ids[span.start : span.start + span.length] != self._ids[span.kind])
            for span, (_, _, _, n) in zip(spans, expected, strict=True)
        ):
            raise RuntimeError("placeholder runs in the encoded prompt do not match the expansions")
        return spans
