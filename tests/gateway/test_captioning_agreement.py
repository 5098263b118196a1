"""LocalAgreement-2 and the repetition guard: worked examples, whisper_streaming's HypothesisBuffer as
a reference, and seeded random hypothesis sequences (the committed prefix never changes)."""

from __future__ import annotations

import random

import pytest

from gemma_mesh.gateway.captioning import (
    LocalAgreement,
    RepetitionGuard,
    normalize_word,
    split_words,
)


def test_normalisation_and_splitting():
    assert normalize_word("Hello,") == normalize_word("hello") == "hello"
    assert normalize_word("«Don't»") == "dont"
    assert normalize_word("ÉTÉ.") == "été"
    assert split_words("  Well — I think ... so.  ") == ["Well —", "I", "think ...", "so."]
    assert split_words("... ok") == ["... ok"]
    assert split_words(" ?! ") == []


def test_two_hypotheses_must_agree():
    agreement = LocalAgreement()
    first = agreement.update("and mister john")
    assert (first.committed, first.tentative, first.newly_committed) == ("", "and mister john", "")
    second = agreement.update("and mister john dashwood had")
    assert (second.committed, second.tentative, second.newly_committed) == (
        "and mister john",
        "dashwood had",
        "and mister john",
    )
    third = agreement.update("and mister john dashwood has then leisure")
    assert (third.committed, third.tentative, third.newly_committed) == (
        "and mister john dashwood",
        "has then leisure",
        "dashwood",
    )
    assert third.text == "and mister john dashwood has then leisure"
    fourth = agreement.update("and mister john dashwood had then leisure to")
    assert fourth.committed == "and mister john dashwood" and fourth.newly_committed == ""
    fifth = agreement.update("and mister john dashwood had then leisure to consider")
    assert fifth.committed == "and mister john dashwood had then leisure to"
    assert fifth.tentative == "consider"
    assert agreement.final("And Mister John Dashwood had then leisure to consider how much.") == (
        "and mister john dashwood had then leisure to consider how much."
    )
    assert agreement.committed == ""  # final() starts the next segment


def test_case_and_punctuation_ignored_newer_spelling_committed():
    agreement = LocalAgreement()
    agreement.update("hello world this")
    result = agreement.update("Hello, world. This is")
    assert result.committed == "Hello, world. This" and result.tentative == "is"


def test_committed_words_are_kept_when_the_decoder_rewrites_them():
    agreement = LocalAgreement()
    agreement.update("the cat sat on")
    assert agreement.update("the cat sat on the").committed == "the cat sat on"
    # A changed committed word, an inserted word and a dropped word: the committed text stays, the
    # new words after the committed ones are found again.
    rewritten = agreement.update("a cat sat on the mat")
    assert (rewritten.committed, rewritten.tentative) == ("the cat sat on the", "mat")
    assert agreement.update("well the cat sat on the mat today").committed == "the cat sat on the mat"
    assert agreement.update("cat sat on the mat today we").committed == "the cat sat on the mat today"
    assert agreement.update("").tentative == ""  # a dropped hypothesis clears the tentative words
    assert agreement.committed == "the cat sat on the mat today"
    assert agreement.final("The cat sat on a rug today, we said.") == "the cat sat on the mat today we said."
    # A re-spelled last word is matched by position, not by the same word far from the committed end.
    agreement.update("the cat sat on the")
    agreement.update("the cat sat on the")
    assert agreement.final("the cat sat on a mat.") == "the cat sat on the mat."


class ReferenceHypothesisBuffer:
    """whisper_streaming's HypothesisBuffer algorithm (insert + flush), re-implemented as the test
    oracle: words carry times; words starting before the last committed end are dropped, committed
    1..5-grams repeated at the head are dropped, and the common prefix with the previous
    hypothesis is committed."""

    def __init__(self) -> None:
        self.committed: list[tuple[float, float, str]] = []
        self.buffer: list[tuple[float, float, str]] = []
        self.last_end = 0.0

    def insert_and_flush(self, words: list[str]) -> list[str]:
        timed = [(float(i), i + 0.5, w) for i, w in enumerate(words)]
        new = [t for t in timed if t[0] > self.last_end - 0.1]
        if new and abs(new[0][0] - self.last_end) < 1 and self.committed:
            for size in range(1, min(len(self.committed), len(new), 5) + 1):
                if [t[2] for t in self.committed[-size:]] == [t[2] for t in new[:size]]:
                    new = new[size:]
                    break
        commit = []
        while new and self.buffer and new[0][2] == self.buffer[0][2]:
            commit.append(new.pop(0))
            self.buffer.pop(0)
        if commit:
            self.last_end = commit[-1][1]
        self.buffer = new
        self.committed += commit
        return [t[2] for t in commit]


def random_hypotheses(rng: random.Random, length: int) -> list[list[str]]:
    """A growing transcript decoded repeatedly: each hypothesis is the true words heard so far with
    a noisy tail (wrong, missing or extra words) and sometimes a wrong earlier word. Noise words
    are tagged with their position and true words never repeat within 6 words, so no word repeats
    across the committed boundary (where HypothesisBuffer's n-gram de-duplication would apply)."""
    truth: list[str] = []
    while len(truth) < length:
        word = f"w{rng.randrange(40)}"
        if word not in truth[-6:]:
            truth.append(word)
    hypotheses, heard = [], 0
    while heard < length:
        heard = min(length, heard + rng.randrange(0, 4))
        words = list(truth[:heard])
        for _ in range(rng.randrange(0, 3)):
            if words and rng.random() < 0.5:
                k = rng.randrange(max(0, len(words) - 4), len(words))
                words[k] = f"n{k}_{rng.randrange(3)}"
        words += [f"n{len(words) + k}_{rng.randrange(3)}" for k in range(rng.randrange(0, 3))]
        hypotheses.append(words)
    return hypotheses


@pytest.mark.parametrize("seed", range(200))
def test_matches_whisper_streaming_hypothesis_buffer(seed):
    """Where each hypothesis repeats the committed words, the commits equal HypothesisBuffer's."""
    rng = random.Random(seed)
    agreement, reference = LocalAgreement(), ReferenceHypothesisBuffer()
    committed: list[str] = []
    for words in random_hypotheses(rng, 30):
        words = committed + words[len(committed) :]
        expected = reference.insert_and_flush(words)
        result = agreement.update(" ".join(words))
        assert result.newly_committed == " ".join(expected)
        committed += expected
        assert result.committed == " ".join(committed)


def perturb_spelling(rng: random.Random, word: str) -> str:
    choice = rng.randrange(4)
    return [word, word.upper(), f"{word},", f"{word.capitalize()}."][choice]


@pytest.mark.parametrize("seed", range(300))
def test_committed_prefix_only_grows(seed):
    rng = random.Random(1000 + seed)
    agreement = LocalAgreement()
    committed_words: list[str] = []
    for words in random_hypotheses(rng, 25):
        if rng.random() < 0.3 and words:  # the decoder rewrites part of the committed span
            start = rng.randrange(len(words))
            words = words[:start] + [perturb_spelling(rng, w) for w in words[start:]]
        if rng.random() < 0.1:
            words = ["uh", *words]  # an inserted word at the head
        result = agreement.update(" ".join(words))
        new_words = result.committed.split()
        assert new_words[: len(committed_words)] == committed_words  # never changed, never shrunk
        assert new_words[len(committed_words) :] == result.newly_committed.split()
        assert set(result.newly_committed.split()) <= set(words)  # committed words were hypothesised
        committed_words = new_words
    final = agreement.final(" ".join(rng.choice([["x"], words])))
    assert final.split()[: len(committed_words)] == committed_words


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("you you you you", ""),
        ("I said you you you you you", "I said"),
        ("Thank you. Thank you. Thank you.", ""),
        ("So I went home. Thank you. Thank you. Thank you. Thank you.", "So I went home."),
        ("and then we and then we and then we and then we", ""),
        ("it is what it is what it is what it is what", ""),
        ("the one the two the three", "the one the two the three"),
        # character loops (no spaces for the word check to see): one copy is kept
        ("ڼ in in in inionionionionionion", "ڼ in in in inio"),
        ("Hello " + "\ufffd" * 16 + " and more", "Hello \ufffd"),
        ("wow" + "!" * 18, "wow!"),
        ("so it goes crcrcrcrcrcrcrcrcr and on", "so it goes cr"),
        ("you you you youuuuuuuuuuuuuuuuuuu", ""),
    ],
)
def test_repetition_guard_cuts_loops(text, kept):
    guard = RepetitionGuard(max_repeats=3, max_word_repeats=4)
    result = guard.check(text)
    looped = kept != text
    assert (result.text, result.looped, result.dropped) == (kept, looped, kept == "")
    assert guard.clean(text) == kept


@pytest.mark.parametrize(
    "text",
    [
        "and mister john dashwood had then leisure to consider how much there might be prudently",
        "no, no, no, I did not say that",
        "very very good",
        "he said that that was that",
        "unless to be rather cold hearted and rather selfish is to be ill disposed",
        "I love you, I love you",
        "hahahaha, Mississippi, 1,000,000,000 and zzz",
        "aaaaaaaaaah!!! wait...",
    ],
)
def test_repetition_guard_leaves_normal_text_unchanged(text):
    guard = RepetitionGuard()
    assert guard.check(text).text == text
    assert not guard.check(text).looped and not guard.check(text).dropped


@pytest.mark.parametrize("text", ["", "   ", "...", " ?! — . ", "\n\t"])
def test_repetition_guard_drops_punctuation_only(text):
    result = RepetitionGuard().check(text)
    assert (result.text, result.looped, result.dropped) == ("", False, True)


def test_repetition_guard_counts_are_structural():
    text = " ".join(["alpha beta gamma delta"] * 3)
    assert RepetitionGuard(max_repeats=3).check(text).looped
    assert not RepetitionGuard(max_repeats=4).check(text).looped
    assert not RepetitionGuard(max_repeats=3, max_ngram_words=3).check(text).looped
    assert RepetitionGuard(max_repeats=2).find_loop(split_words("x y a b a b")) == 2
    buffalo = "Buffalo buffalo Buffalo buffalo buffalo"
    assert RepetitionGuard(max_word_repeats=5).check(buffalo).looped
    assert not RepetitionGuard(max_word_repeats=6).check(buffalo).looped
    with pytest.raises(ValueError):
        RepetitionGuard(max_repeats=1)


def test_streamed_loops_are_seen_when_they_end():
    guard = RepetitionGuard()
    text = "so I went you you you you and then"
    fired = [i for i in range(1, len(text) + 1) if guard.ends_in_loop(text[:i])]
    assert text[: fired[0]] == "so I went you you you you "  # the 4th copy is complete
    junk = "abc " + "x" * 20
    fired = [i for i in range(1, len(junk) + 1) if guard.ends_in_loop(junk[:i])]
    assert fired[0] == len("abc ") + 16
    assert not any(
        guard.ends_in_loop(t[:i]) for t in ("no, no, no, I said", "Mississippi") for i in range(len(t))
    )


def test_streamed_loop_check_fires_exactly_when_the_full_check_first_finds_a_loop():
    """``ends_in_loop`` over every prefix (character by character) first fires at the prefix where
    ``find_loop`` over the complete words first finds a loop (random texts from a small vocabulary)."""
    guard = RepetitionGuard()
    rng = random.Random(5)
    vocab = ["alpha", "beta", "gamma,", "Delta", "eps."]
    seen_loops = 0
    for _ in range(300):
        text = " ".join(rng.choices(vocab, weights=[5, 2, 1, 1, 1], k=rng.randint(3, 30))) + " "
        first_stream = next((i for i in range(1, len(text) + 1) if guard.ends_in_loop(text[:i])), None)
        # streamed one character at a time with the delta: the same answer, fewer word checks
        assert first_stream == next(
            (i for i in range(1, len(text) + 1) if guard.ends_in_loop(text[:i], text[i - 1])), None
        )

        def complete(prefix: str) -> list[str]:
            words = split_words(prefix)
            return words if prefix[-1].isspace() else words[:-1]

        first_full = next(
            (i for i in range(1, len(text) + 1) if guard.find_loop(complete(text[:i])) is not None), None
        )
        assert first_stream == first_full, text
        seen_loops += first_full is not None
    assert 30 < seen_loops < 300  # both kinds of text were drawn
