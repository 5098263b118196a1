"""Per-request output policy: token ids -> text deltas on the answer or reasoning channel, and when to stop.

Pure (no model, no clock). Mirrors how Gemma 4 formats a turn: with thinking on, the model writes
``<|channel>thought\\n ... <channel|>`` and then the answer; ``<turn|>`` (or ``<eos>``) ends the turn.

- Thoughts go to the REASONING channel and never into the answer. With thinking off, anything the
  model still puts in a thought channel is dropped (peers leak it into transcripts).
- Stop strings apply to the answer text: text that could still become a stop string is held back,
  the stop string itself is never emitted.
- Text is UTF-8 safe (``IncrementalDetokenizer``): a delta never ends in half a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from tokenizers import Tokenizer

from gemma_mesh.model.detokenize import IncrementalDetokenizer

# The label Gemma 4 writes after <|channel> for its thoughts.
THOUGHT_LABEL = "thought\n"


class Channel(Enum):
    ANSWER = "answer"
    REASONING = "reasoning"


class FinishReason(Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass
class Delta:
    """New text on one channel and the ids of the tokens consumed since the previous delta."""

    channel: Channel
    text: str
    token_ids: list[int] = field(default_factory=list)
    # One per token id when the request asked for log-probabilities (``model.sampling.TokenLogprob``).
    logprobs: list = field(default_factory=list)


class OutputProcessor:
    """Turns one request's generated tokens into deltas and decides when it is finished.

    Args:
        tokenizer: the bundle's tokenizer.
        stop_token_ids: ids that end the turn (the manifest's ``stop_token_ids``).
        channel_start_id / channel_end_id: the thought-channel markers (None if the vocabulary has none).
        stop_strings: answer substrings that end generation (not emitted).
        enable_thinking: keep thoughts (on the REASONING channel) or drop them.
        max_tokens: generated-token budget (the stop token counts).
        keep_token_ids: special tokens whose text stays in the answer (the tool-call markers, for
            a caller that parses calls); other special tokens never appear in text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop_token_ids: Sequence[int],
        channel_start_id: int | None,
        channel_end_id: int | None,
        stop_strings: Sequence[str] = (),
        enable_thinking: bool = False,
        max_tokens: int,
        keep_token_ids: Sequence[int] = (),
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop_ids = set(stop_token_ids)
        self._channel_start = channel_start_id
        self._channel_end = channel_end_id
        self._stops = [s for s in stop_strings if s]
        self._thinking = enable_thinking
        self._max_tokens = max_tokens
        self._keep = {int(t): tokenizer.id_to_token(int(t)) for t in keep_token_ids}
        self._in_thought = False
        self._label_pending: str | None = None  # thought text until the label is seen or ruled out
        self._held = ""  # answer text that may be the start of a stop string
        self._ids: list[int] = []
        self.generated = 0
        self.finish_reason: FinishReason | None = None

    def push(self, token_id: int) -> list[Delta]:
        """Consume one generated token; returns deltas (possibly none). Sets ``finish_reason`` when done."""
        if self.finish_reason is not None:
            raise RuntimeError("push() after the request finished")
        self.generated += 1
        self._ids.append(int(token_id))
        out: list[Delta] = []
        if token_id in self._stop_ids:
            out += self._flush_text()
            out += self._release_held(final=True)
            self.finish_reason = FinishReason.STOP
        elif token_id == self._channel_start and not self._in_thought:
            out += self._flush_text()
            self._in_thought, self._label_pending = True, ""
        elif token_id == self._channel_end and self._in_thought:
            out += self._flush_text()
            self._in_thought = False
        elif token_id in self._keep:
            out += self._flush_text()
            out += self._route(self._keep[token_id])
        else:
            out += self._route(self._detok.push(token_id))
        if self.finish_reason is None and self.generated >= self._max_tokens:
            out += self._flush_text()
            out += self._release_held(final=True)
            if self.finish_reason is None:
                self.finish_reason = FinishReason.LENGTH
        return self._attach_ids(out)

    # ------------------------------------------------------------------ text
    def _flush_text(self) -> list[Delta]:
        return self._route(self._detok.flush())

    def _route(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self._in_thought:
            if not self._thinking:
                return []
            if self._label_pending is not None:
                self._label_pending += text
                if len(self._label_pending) < len(THOUGHT_LABEL) and THOUGHT_LABEL.startswith(
                    self._label_pending
                ):
                    return []
                text = self._label_pending.removeprefix(THOUGHT_LABEL)
                self._label_pending = None
            return [Delta(Channel.REASONING, text)] if text else []
        self._held += text
        return self._release_held(final=False)

    def _release_held(self, *, final: bool) -> list[Delta]:
        for stop in self._stops:
            at = self._held.find(stop)
            if at >= 0:
                text, self._held = self._held[:at], ""
                self.finish_reason = FinishReason.STOP
                return [Delta(Channel.ANSWER, text)] if text else []
        keep = 0 if final else self._longest_stop_prefix_suffix()
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return [Delta(Channel.ANSWER, text)] if text else []

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _attach_ids(self, deltas: list[Delta]) -> list[Delta]:
        if deltas:
            deltas[0].token_ids = self._ids
            self._ids = []
        return deltas

    @property
    def pending_token_ids(self) -> list[int]:
        """Ids consumed but not yet reported in a delta (e.g. a final stop token)."""
        return list(self._ids)
