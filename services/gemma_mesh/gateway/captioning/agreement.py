"""Stabilising partial captions: LocalAgreement-2 over word lists, and a guard against looping decodes.

Pure policy: strings in, decisions out. The caller decodes the open segment's audio every
``partial_interval_ms`` and passes each hypothesis (the whole segment's text so far) through
``RepetitionGuard.check`` and then ``LocalAgreement.update``; the segment's final decode goes to
``LocalAgreement.final``.

Words are whitespace-separated tokens (a token of punctuation only is attached to the word before
it). Words are compared case- and punctuation-insensitively but emitted as written. Scripts written
without spaces (Chinese, Japanese, Thai) form one word per run of text, so they commit only when a
whole run agrees.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# whisper_streaming's HypothesisBuffer.insert looks for 1..5 committed words repeated at the head of
# a new hypothesis; the same bound is used here to re-align a hypothesis that rewrote committed words.
MAX_ALIGN_NGRAM_WORDS = 5
# How far (in words) from the committed length the re-aligned end of the committed words may be.
MAX_ALIGN_SHIFT_WORDS = 3


def normalize_word(word: str) -> str:
    """The matching key of a word: case-folded, NFKC, with punctuation (Unicode ``P*``) removed."""
    folded = unicodedata.normalize("NFKC", word).casefold()
    return "".join(c for c in folded if not unicodedata.category(c).startswith("P"))


def split_words(text: str) -> list[str]:
    """``text`` split on whitespace; a token with no letters or digits (``"-"``, ``"..."``) is attached
    to the word before it (or the one after it at the start), so every word has a non-empty key."""
    words: list[str] = []
    leading = ""
    for token in text.split():
        if not normalize_word(token):
            if words:
                words[-1] = f"{words[-1]} {token}"
            else:
                leading = f"{leading}{token} "
            continue
        words.append(leading + token)
        leading = ""
    return words


@dataclass(frozen=True, slots=True)
class AgreementResult:
    """The caption after a hypothesis: ``committed`` (the stable prefix; only ever extended),
    ``tentative`` (the rest of the newest hypothesis, may change) and ``newly_committed`` (the words
    this update appended to ``committed``). Each is space-joined words, ``""`` when empty."""

    committed: str
    tentative: str
    newly_committed: str

    @property
    def text(self) -> str:
        """What to display: committed then tentative."""
        return " ".join(part for part in (self.committed, self.tentative) if part)


class LocalAgreement:
    """LocalAgreement-2 (Macháček et al. 2023, ``HypothesisBuffer`` in ufal/whisper_streaming's
    ``whisper_online.py``): a word is committed once two consecutive hypotheses agree on it and on
    everything before it. Committed words are never changed or removed.

    Each hypothesis is the text of the whole segment so far. Its words after the committed prefix
    are found by position when its start matches the committed words (case and punctuation
    ignored); otherwise after the last 1..5 committed words, as ``HypothesisBuffer.insert`` matches
    them, where they reappear within 3 words of the committed length; failing that, by position. Those words are
    compared with the previous hypothesis's uncommitted words (``HypothesisBuffer.flush``): the
    common prefix is committed, spelled as in the newer hypothesis.

    One instance per segment (``reset`` or ``final`` start the next).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the segment: nothing committed, no previous hypothesis."""
        self._committed: list[str] = []
        self._buffer: list[str] = []  # uncommitted words of the previous hypothesis

    @property
    def committed(self) -> str:
        """The committed text so far."""
        return " ".join(self._committed)

    def update(self, hypothesis: str) -> AgreementResult:
        """Agree the newest partial hypothesis (the segment's whole text so far) with the previous one.

        Args:
            hypothesis: decoded text; ``""`` (a dropped hypothesis) clears the tentative words.
        """
        tail = self._after_committed(split_words(hypothesis))
        agreed = 0
        for previous, new in zip(self._buffer, tail, strict=False):
            if normalize_word(previous) != normalize_word(new):
                break
            agreed += 1
        newly = tail[:agreed]
        self._committed.extend(newly)
        self._buffer = tail[agreed:]
        return AgreementResult(self.committed, " ".join(self._buffer), " ".join(newly))

    def final(self, text: str) -> str:
        """The segment's final caption: the committed words, then the final decode's words after them
        (aligned as in ``update``). Resets for the next segment.

        Args:
            text: the final decode of the closed segment.
        """
        words = self._committed + self._after_committed(split_words(text))
        self.reset()
        return " ".join(words)

    def _after_committed(self, words: list[str]) -> list[str]:
        """The words of a whole-segment hypothesis that follow the committed ones."""
        n = len(self._committed)
        if n == 0:
            return words
        keys = [normalize_word(w) for w in words]
        committed_keys = [normalize_word(w) for w in self._committed]
        if keys[:n] == committed_keys:
            return words[n:]
        # The decoder re-spelled, inserted or dropped words in the committed span: find where the last
        # committed words reappear near the committed length (whisper_streaming drops 1..5 committed
        # words repeated at the head of a new hypothesis), else fall back to the position.
        for size in range(min(MAX_ALIGN_NGRAM_WORDS, n, len(words)), 0, -1):
            suffix = committed_keys[-size:]
            ends = [
                i + size
                for i in range(len(keys) - size + 1)
                if abs(i + size - n) <= MAX_ALIGN_SHIFT_WORDS and keys[i : i + size] == suffix
            ]
            if ends:
                return words[min(ends, key=lambda end: (abs(end - n), -end)) :]
        return words[n:]


@dataclass(frozen=True, slots=True)
class GuardResult:
    """A hypothesis after ``RepetitionGuard.check``: ``text`` to use (``""`` when dropped),
    ``looped`` (a repetition loop was cut off), ``dropped`` (nothing usable: use no update)."""

    text: str
    looped: bool
    dropped: bool


class RepetitionGuard:
    """Cuts decoder loops out of a hypothesis and drops hypotheses with no words.

    A **word loop** is a run of words (an n-gram, 1 <= n <= ``max_ngram_words``) repeated back to
    back at least ``max_repeats`` times (``"you you you you"``, ``"Thank you. Thank you. Thank
    you."``), compared case- and punctuation-insensitively. A **character loop** is a string of 1 to
    ``max_char_period`` non-space characters repeated back to back at least 4 times and over at least
    ``min_char_loop_chars`` characters (``"ionionionionion..."``, sixteen ``"!"``): the degenerate
    output of a decoder that has lost the audio, which has no spaces for the word check to see.
    The text is cut at the earliest loop: a word loop loses every copy (a looping decoder has lost
    the audio, so the looped words are not trusted); a character loop keeps one copy of its
    repeated string (``"wow!!!!!!!!..."`` -> ``"wow!"``), the rest is dropped.
    Whisper guards against the same failure with a gzip compression-ratio threshold; this is the
    structural form of it.

    ``ends_in_loop`` is the streaming form: it tells a caller reading a decode token by token that
    the text so far ends in a loop, so the decode can be stopped there instead of running on to its
    token budget (every later token would be cut anyway).

    Args:
        max_repeats: consecutive copies of an n-gram of 2+ words that make a loop (>= 2).
        max_word_repeats: consecutive copies of one word that make a loop (natural speech repeats a
            word, "no, no, no", more often than a phrase); None = ``max_repeats``.
        max_ngram_words: longest n-gram checked, in words.
        max_char_period: longest repeated string of a character loop, in characters (0 = no
            character loops).
        min_char_loop_chars: shortest character loop, in characters (all copies together).

    Raises:
        ValueError: a count below 2, ``max_ngram_words`` below 1, or a negative character setting.
    """

    CHAR_LOOP_MIN_REPEATS = 4

    def __init__(
        self,
        max_repeats: int = 3,
        max_word_repeats: int | None = 4,
        max_ngram_words: int = 12,
        max_char_period: int = 8,
        min_char_loop_chars: int = 16,
    ) -> None:
        self.max_repeats = max_repeats
        self.max_word_repeats = max_repeats if max_word_repeats is None else max_word_repeats
        self.max_ngram_words = max_ngram_words
        if min(self.max_repeats, self.max_word_repeats) < 2 or max_ngram_words < 1:
            raise ValueError("repeat counts must be >= 2 and max_ngram_words >= 1")
        if max_char_period < 0 or min_char_loop_chars < 0:
            raise ValueError("max_char_period and min_char_loop_chars must be >= 0")
        # period p -> copies needed: at least 4, and at least min_char_loop_chars characters in all
        self._char_copies = {
            p: max(self.CHAR_LOOP_MIN_REPEATS, -(-min_char_loop_chars // p))
            for p in range(1, max_char_period + 1)
        }
        self._char_patterns = [
            re.compile(rf"(\S{{{p}}})\1{{{copies - 1},}}") for p, copies in self._char_copies.items()
        ]

    def check(self, hypothesis: str) -> GuardResult:
        """``hypothesis`` cut before its first loop; dropped if nothing but punctuation remains."""
        text = hypothesis
        looped = False
        char_loop = self.find_char_loop(text)
        if char_loop is not None:  # keep one copy of the repeated string, drop the rest
            looped = True
            start, period = char_loop
            text = text[: start + period]
        words = split_words(text)
        loop_start = self.find_loop(words)
        if loop_start is not None:
            looped = True
            words = words[:loop_start]
        if not words:
            return GuardResult("", looped=looped, dropped=True)
        text = " ".join(words) if looped else hypothesis.strip()
        return GuardResult(text, looped=looped, dropped=False)

    def clean(self, hypothesis: str) -> str:
        """``check(hypothesis).text``: the usable text, ``""`` when the hypothesis is dropped."""
        return self.check(hypothesis).text

    def find_loop(self, words: list[str]) -> int | None:
        """Index of the first word of the earliest word loop in ``words``, or None."""
        keys = [normalize_word(w) for w in words]
        for start in range(len(keys)):
            for size in range(1, min(self.max_ngram_words, len(keys) - start) + 1):
                needed = self.max_word_repeats if size == 1 else self.max_repeats
                if start + size * needed > len(keys):
                    continue
                gram = keys[start : start + size]
                if all(keys[start + k * size : start + (k + 1) * size] == gram for k in range(1, needed)):
                    return start
        return None

    def find_char_loop(self, text: str) -> tuple[int, int] | None:
        """``(start, period)`` of the earliest character loop in ``text`` (shortest period first at
        equal starts), or None."""
        found = [(m.start(), len(m.group(1))) for m in (p.search(text) for p in self._char_patterns) if m]
        return min(found) if found else None

    def ends_in_loop(self, text: str, delta: str | None = None) -> bool:
        """Whether streamed ``text`` (a decode so far) now ends in a loop: a character loop ending at
        its last character, or a word loop ending at its last complete word (a word is complete once
        whitespace follows it). Looks only at the tail a loop can span (``max_ngram_words`` x the
        repeat count, in words), so a check after every streamed delta costs the same at any length.
        A caller that skips checks (merged deltas) may see a loop one delta after it ended. With
        ``delta`` (the text just appended), the word check runs only when it holds whitespace: a
        word loop can only complete when a word does."""
        for p, copies in self._char_copies.items():
            tail = text[-p * copies :]
            if (
                len(tail) == p * copies
                and tail == tail[:p] * copies
                and not any(c.isspace() for c in tail[:p])
            ):
                return True
        if delta is not None and not any(c.isspace() for c in delta):
            return False
        span = self.max_ngram_words * max(self.max_repeats, self.max_word_repeats)
        tokens = text.rsplit(None, 2 * span)  # the last 2*span whitespace tokens (and the head)
        if len(tokens) > 2 * span:
            tokens = tokens[1:]
        words = split_words(" ".join(tokens))
        if words and text and not text[-1].isspace():
            words = words[:-1]  # the last word may still grow
        keys = [normalize_word(w) for w in words[-span:]]
        for size in range(1, self.max_ngram_words + 1):
            needed = self.max_word_repeats if size == 1 else self.max_repeats
            if size * needed > len(keys):
                continue
            gram = keys[len(keys) - size :]
            if all(keys[len(keys) - (k + 1) * size : len(keys) - k * size] == gram for k in range(1, needed)):
                return True
        return False
