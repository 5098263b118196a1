"""Streaming detokenization that never emits half a UTF-8 character.

Byte-fallback tokenizers (Gemma's) split a multi-byte character over several tokens; decoding
them one at a time gives U+FFFD. Like TGI's ``decode_token`` (prefix and read offsets), we decode a
short window of recent ids and emit only the new suffix, holding it back while it ends in an
incomplete character.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Args:
        tokenizer: the bundle's ``tokenizers.Tokenizer``.
        skip_special_tokens: drop control tokens (turn markers, ...) from the text.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one id and return the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        prefix = self._tok.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip
        )
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (may contain U+FFFD for truly invalid bytes)."""
        prefix = self._tok.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip
        )
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]
