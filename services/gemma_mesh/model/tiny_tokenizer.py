"""A small, deterministic Gemma 4-style tokenizer for the tiny test checkpoint.

``write_tiny_tokenizer(out_dir)`` writes what a Hugging Face Gemma 4 checkpoint carries for its
tokenizer: ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``.

The tokenizer is the GemmaTokenizer pipeline of transformers 5.23 (``models/gemma/tokenization_gemma.py``):
a BPE model with ``byte_fallback=True`` and ``fuse_unk=True``, the normalizer ``Replace(" ", "▁")``,
the pre-tokenizer ``Split(" ", "merged_with_previous")``, the decoder ``Replace("▁", " ")`` +
``ByteFallback`` + ``Fuse``. ``AutoTokenizer`` rebuilds exactly this pipeline from the file's vocab
and merges (GemmaTokenizer has its own ``__init__``), so ``tokenizers.Tokenizer.from_file`` and
``AutoTokenizer.from_pretrained`` encode alike.

Vocabulary, in id order: the five standard specials at Gemma's ids (pad 0, eos 1, bos 2, unk 3,
mask 4), the other Gemma 4 special tokens, the 256 byte tokens ``<0x00>``..``<0xFF>`` (so any text
encodes), ``▁``, ``\\n``, ``\\t`` and printable ASCII, then BPE merges learned from the English text
below, then ``<unusedN>`` fillers up to ``vocab_size`` (as the real vocabulary has unused slots).
Every special token is an added token with ``special=True, normalized=False``.

As in transformers' Gemma 4 conversion (``add_bos_token=False``), the post-processor adds no BOS:
the chat template writes ``<bos>`` itself.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from gemma_mesh.model.manifest import GEMMA4_SPECIAL_TOKENS

__all__ = [
    "CONFIG_TOKEN_NAMES",
    "SPECIAL_TOKENS",
    "TEMPLATE_PATH",
    "build_tiny_tokenizer",
    "write_tiny_tokenizer",
]

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "gemma4_chat_template.jinja"

# Role name -> token string, in vocabulary order (ids 0..len-1): Gemma's pad/eos/bos first (ids 0-2
# as in the real checkpoint), then the control tokens of the Gemma 4 format (one definition, in
# manifest.py), then the media tokens.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    **GEMMA4_SPECIAL_TOKENS,
    "boi": "<|image>",
    "image": "<|image|>",
    "eoi": "<image|>",
    "boa": "<|audio>",
    "audio": "<|audio|>",
    "eoa": "<audio|>",
    "video": "<|video|>",
}

# Role name -> tokenizer_config.json key. The standard five are top-level keys; the others are the
# model-specific named tokens of transformers' Gemma 4 conversion (``extra_special_tokens``), which
# give ``tokenizer.image_token``, ``tokenizer.image_token_id`` etc. and are template variables.
CONFIG_TOKEN_NAMES: dict[str, str] = {
    "pad": "pad_token",
    "eos": "eos_token",
    "bos": "bos_token",
    "unk": "unk_token",
    "mask": "mask_token",
    "image": "image_token",
    "boi": "boi_token",
    "eoi": "eoi_token",
    "audio": "audio_token",
    "boa": "boa_token",
    "eoa": "eoa_token",
    "video": "video_token",
    "turn_start": "sot_token",
    "turn_end": "eot_token",
    "channel_start": "soc_token",
    "channel_end": "eoc_token",
    "think": "think_token",
    "string_delimiter": "escape_token",
    "tool_response_start": "str_token",
    "tool_response_end": "etr_token",
    "tool_call_start": "stc_token",
    "tool_call_end": "etc_token",
    "tool_start": "std_token",
    "tool_end": "etd_token",
}
_STANDARD = ("pad", "eos", "bos", "unk", "mask")
_SPACE = "▁"
_BASE_CHARS = (_SPACE, "\n", "\t", *(chr(c) for c in range(0x21, 0x7F)))

# Training text for the merges. Plain English in the register of the tests and the demo prompts.
_CORPUS = """\
The model reads the whole conversation before it answers. A user turn may hold text, an image,
a short audio clip or a few frames of video, and the model turn that follows should describe
what it sees and hears in plain words. Describe this image in one sentence. What is the person
in the picture doing? Transcribe the audio exactly as it is spoken. Translate the speech into
French, then into German. What happens in this video, and when does it happen?
The weather in Paris is sunny today, with a light wind from the west and a high of twenty
degrees. Tomorrow there will be rain in the morning and clouds in the afternoon. The city has
many small streets, old bridges over the river, and cafes where people sit for hours.
She said that the house was very quiet in the evening, and that the family would walk along the
road to the village when the sun was low. There was a garden behind the house with apple trees,
a long wall of stone, and a gate that opened onto the fields. They talked about their friends,
their plans for the summer, and the letters they had written and received during the winter.
You are a helpful assistant. Answer briefly and clearly. If you are not sure, say so. Think step
by step when the question is hard, and give the final answer at the end. Use the tools when they
help: call the function with the right arguments, read the result, and then answer the user.
get_weather(city, unit) returns the temperature and the conditions for a city. The unit is
celsius or fahrenheit. search(query) returns a list of results with a title, a link and a
snippet. The answer should mention the source of each fact.
An astronaut stands in front of a flag and smiles at the camera. A cat sleeps on a chair near
the window. Two people are talking at a table. The camera moves slowly from left to right.
Numbers and times: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 40 50 60 100 2024 2025 00:00 00:01
00:02 00:05 00:10 01:00 12:30. It is 3.5 km long, costs $12.99 and weighs 70 kg (about 150 lb).
Questions, answers, and lists: first, second, third; yes or no; true or false; "quoted text",
'single quotes', [brackets], {braces}, <angles>, a/b, a-b, a_b, a+b=c, 50% of 8 is 4!
"""


def _train_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``n_merges`` BPE merges from ``corpus``, deterministically.

    Words are the normalized text split before each ``▁`` and around newlines. Each step merges
    the most frequent adjacent pair; ties go to the lexicographically smallest pair.
    """
    normalized = corpus.replace(" ", _SPACE)
    words = Counter(tuple(w) for w in re.findall(rf"{_SPACE}?[^{_SPACE}\n]+|{_SPACE}+|\n+", normalized))
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Build the tokenizer in memory (see the module docstring for its layout).

    Args:
        vocab_size: total number of ids, special tokens included.

    Raises:
        ValueError: ``vocab_size`` cannot hold the special, byte and base-character tokens.
    """
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS.values(), *(f"<0x{b:02X}>" for b in range(256)), *_BASE_CHARS]:
        vocab.setdefault(token, len(vocab))
    if vocab_size <= len(vocab):
        raise ValueError(
            f"vocab_size must be greater than {len(vocab)} (specials, bytes and base characters)"
        )
    merges = _train_merges(_CORPUS, vocab_size - len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))  # two merges can make the same token
    filler = 0
    while len(vocab) < vocab_size:
        vocab[f"<unused{filler}>"] = len(vocab)
        filler += 1

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS["unk"], fuse_unk=True, byte_fallback=True
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A:0", pair="$A:0 $B:1", special_tokens=[]
    )
    tokenizer.add_special_tokens([_added_token(token) for token in SPECIAL_TOKENS.values()])
    return tokenizer


def _added_token(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _tokenizer_config(token_ids: dict[str, int]) -> dict[str, object]:
    added = {
        str(token_ids[role]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for role, token in SPECIAL_TOKENS.items()
    }
    config: dict[str, object] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "backend": "tokenizers",
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {
            CONFIG_TOKEN_NAMES[role]: token for role, token in SPECIAL_TOKENS.items() if role not in _STANDARD
        },
        "model_max_length": 1_000_000,
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
    }
    config.update({CONFIG_TOKEN_NAMES[role]: SPECIAL_TOKENS[role] for role in _STANDARD})
    return dict(sorted(config.items()))


def write_tiny_tokenizer(out_dir: Path, *, vocab_size: int = 512) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` into ``out_dir``.

    The same arguments always give the same files, byte for byte.

    Args:
        out_dir: the checkpoint directory (created if missing).
        vocab_size: total number of ids (the text model's ``vocab_size``); at least 378.

    Returns:
        The special-token ids by role name: ``pad, eos, bos, unk, mask, turn_start, turn_end, think,
        channel_start, channel_end, tool_start, tool_end, tool_call_start, tool_call_end,
        tool_response_start, tool_response_end, string_delimiter, boi, image, eoi, boa, audio, eoa,
        video`` (pad 0, eos 1, bos 2, unk 3, mask 4 as in Gemma; the rest follow in that order).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size)
    token_ids = {role: tokenizer.token_to_id(token) for role, token in SPECIAL_TOKENS.items()}
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config_text = json.dumps(_tokenizer_config(token_ids), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    (out_dir / "chat_template.jinja").write_bytes(TEMPLATE_PATH.read_bytes())
    return token_ids
