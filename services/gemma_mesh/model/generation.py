"""Prefill and decode with the ONNX decoder and an explicit KV cache (torch-free).

This is the reference generation loop that ``gemma-mesh generate`` and the parity tests use; the
decoder service builds its continuous-batching engine on the same pieces (``build_masks``,
``KVCache``, ``embed_prompt``).

Masks follow transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask``: key ``j``
is visible to query ``i`` (both cache indices) when the key is not padding, ``j <= i``, and for
sliding layers ``i - j < sliding_window``. Position ids follow ``generate()``: the cumulative count
of non-padding tokens minus one (left padding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.model.sampling import Sampler, SamplingParams


def build_masks(
    key_valid: np.ndarray, past_len: int, seq_len: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean attention masks for one step.

    Args:
        key_valid: ``[B, past_len + seq_len]`` bool, False for padding keys.
        past_len: cached keys before this step.
        seq_len: queries in this step.
        window: the sliding window (tokens).

    Returns:
        ``(full [B, 1, S, T], sliding [B, 1, S, T])`` with ``T = past_len + seq_len``.
    """
    total = past_len + seq_len
    q = np.arange(seq_len)[:, None] + past_len
    k = np.arange(total)[None, :]
    causal = k <= q
    sliding = causal & ((q - k) < window)
    valid = key_valid[:, None, None, :]
    return causal[None, None] & valid, sliding[None, None] & valid


@dataclass
class KVCache:
    """Per-layer past keys/values ``[B, kvH, T, D]`` for the layers that own a cache (``manifest.text.kv_layers``)."""

    keys: dict[int, np.ndarray] = field(default_factory=dict)
    values: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, bundle: ModelBundle, batch: int) -> KVCache:
        cache = cls()
        text = bundle.manifest.text
        for idx in text.kv_layers:
            layer = text.layers[idx]
            shape = (batch, layer.num_key_value_heads, 0, layer.head_dim)
            cache.keys[idx] = np.zeros(shape, dtype=bundle.float_dtype)
            cache.values[idx] = np.zeros(shape, dtype=bundle.float_dtype)
        return cache

    @property
    def length(self) -> int:
        first = next(iter(self.keys.values()))
        return int(first.shape[2])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys.values()) + sum(a.nbytes for a in self.values.values())


def embed_prompt(
    bundle: ModelBundle, input_ids: np.ndarray, soft_tokens: Sequence[tuple[int, np.ndarray]] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``input_ids [S]`` and write soft tokens over their placeholder rows.

    Args:
        soft_tokens: ``(placeholder_id, tokens [n, H])`` in prompt order; each group fills the next
            ``n`` positions holding ``placeholder_id`` (images, audio and video may interleave).

    Returns:
        ``(inputs_embeds [S, H], per_layer_inputs [S, L, P])``.

    Raises:
        InvalidRequest: the soft-token counts do not match the placeholders in the prompt.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    embeds, per_layer = bundle.embed(ids[None])
    embeds, per_layer = embeds[0], per_layer[0]
    cursor: dict[int, int] = {}
    for placeholder, tokens in soft_tokens:
        positions = np.flatnonzero(ids == placeholder)
        start = cursor.get(placeholder, 0)
        rows = positions[start : start + tokens.shape[0]]
        if rows.shape[0] != tokens.shape[0]:
            raise InvalidRequest(
                f"soft tokens do not match the prompt: {tokens.shape[0]} tokens for {rows.shape[0]} free "
                f"placeholder positions of id {placeholder}"
            )
        embeds[rows] = tokens.astype(embeds.dtype)
        cursor[placeholder] = start + tokens.shape[0]
    for placeholder, used in cursor.items():
        total = int(np.count_nonzero(ids == placeholder))
        if used != total:
            raise InvalidRequest(
                f"prompt has {total} placeholders of id {placeholder} but {used} soft tokens"
            )
    for role in ("image", "audio", "video"):
        if role in bundle.manifest.special_tokens:
            pid = bundle.manifest.token_id(role)
            if pid not in cursor and np.any(ids == pid):
                raise InvalidRequest(f"prompt has {role} placeholders but no {role} soft tokens were given")
    return embeds, per_layer


class DecoderRunner:
    """Runs ``decoder_model_merged`` one step at a time over a ``KVCache``."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.session = bundle.session("decoder_model_merged")
        self.kv_layers = bundle.manifest.text.kv_layers
        self.window = bundle.manifest.text.sliding_window

    def step(
        self,
        inputs_embeds: np.ndarray,
        per_layer_inputs: np.ndarray,
        key_valid: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        logits_indices: np.ndarray | None = None,
    ) -> tuple[np.ndarray, KVCache]:
        """One forward pass: ``inputs_embeds [B, S, H]`` -> ``(logits [B, K, V], cache grown by S)``.

        ``logits_indices [B, K]``: the step positions whose logits are computed (default: all ``S``).
        """
        batch, seq = inputs_embeds.shape[:2]
        if logits_indices is None:
            logits_indices = np.broadcast_to(np.arange(seq), (batch, seq))
        full, sliding = build_masks(key_valid, cache.length, seq, self.window)
        feeds = {
            "inputs_embeds": inputs_embeds,
            "per_layer_inputs": per_layer_inputs,
            "attention_mask": full,
            "sliding_attention_mask": sliding,
            "position_ids": position_ids.astype(np.int64),
            "logits_indices": np.ascontiguousarray(logits_indices, dtype=np.int64),
        }
        for idx in self.kv_layers:
            feeds[f"past_key_values.{idx}.key"] = cache.keys[idx]
            feeds[f"past_key_values.{idx}.value"] = cache.values[idx]
        outputs = self.session.run(None, feeds)
        new = KVCache()  # the graph returns the step's keys/values; the past is appended here
        for n, idx in enumerate(self.kv_layers):
            new.keys[idx] = np.concatenate([cache.keys[idx], outputs[1 + 2 * n]], axis=2)
            new.values[idx] = np.concatenate([cache.values[idx], outputs[2 + 2 * n]], axis=2)
        return outputs[0], new


@dataclass
class PromptInput:
    """One prompt: token ids ``[S]`` and its soft tokens ``(placeholder_id, [n, H])`` in order."""

    input_ids: np.ndarray
    soft_tokens: Sequence[tuple[int, np.ndarray]] = ()


def generate(
    bundle: ModelBundle,
    prompts: Sequence[PromptInput],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> Iterator[list[int | None]]:
    """Generate for a left-padded batch; yields, per step, each prompt's new token (None once finished).

    Mirrors ``Gemma4ForConditionalGeneration.generate()`` with left padding: greedy outputs equal
    transformers' token for token. Stops at ``stop_token_ids`` (default: the bundle's EOS list,
    end-of-turn included) or after ``max_new_tokens``.

    Raises:
        InvalidRequest: empty batch or prompt, ``max_new_tokens <= 0``, a prompt over the context length.
    """
    if not prompts:
        raise InvalidRequest("no prompts given")
    if max_new_tokens <= 0:
        raise InvalidRequest(f"max_new_tokens must be > 0, got {max_new_tokens}", param="max_tokens")
    text = bundle.manifest.text
    lengths = [int(np.asarray(p.input_ids).shape[0]) for p in prompts]
    if min(lengths) == 0:
        raise InvalidRequest("empty prompt")
    longest = max(lengths)
    if longest + max_new_tokens > text.max_position_embeddings:
        raise InvalidRequest(
            f"prompt ({longest} tokens) plus max_tokens ({max_new_tokens}) exceeds the context length "
            f"of {text.max_position_embeddings} tokens"
        )
    stops = set(bundle.manifest.stop_token_ids if stop_token_ids is None else stop_token_ids)
    batch = len(prompts)
    embeds = np.zeros((batch, longest, text.hidden_size), dtype=bundle.float_dtype)
    per_layer = np.zeros(
        (batch, longest, text.num_hidden_layers, max(text.hidden_size_per_layer_input, 1)),
        dtype=bundle.float_dtype,
    )
    valid = np.zeros((batch, longest), dtype=bool)
    for b, prompt in enumerate(prompts):
        e, p = embed_prompt(bundle, prompt.input_ids, prompt.soft_tokens)
        embeds[b, longest - lengths[b] :] = e
        per_layer[b, longest - lengths[b] :] = p
        valid[b, longest - lengths[b] :] = True
    positions = np.where(valid, np.cumsum(valid, axis=1) - 1, 1)

    runner = DecoderRunner(bundle)
    samplers = [Sampler(sampling or SamplingParams()) for _ in range(batch)]
    last = np.full((batch, 1), longest - 1)  # left padding: every prompt ends at the last column
    logits, cache = runner.step(embeds, per_layer, valid, positions, KVCache.empty(bundle, batch), last)
    done = [False] * batch
    next_pos = positions[:, -1] + 1
    for _ in range(max_new_tokens):
        tokens: list[int | None] = []
        for b in range(batch):
            tokens.append(None if done[b] else samplers[b](logits[b, -1]))
        yield tokens
        for b, t in enumerate(tokens):
            if t is not None and t in stops:
                done[b] = True
        if all(done):
            return
        step_ids = np.array(
            [[t if t is not None else bundle.manifest.token_id("pad")] for t in tokens], np.int64
        )
        e, p = bundle.embed(step_ids)
        valid = np.concatenate([valid, np.ones((batch, 1), dtype=bool)], axis=1)
        logits, cache = runner.step(e, p, valid, next_pos[:, None], cache)
        next_pos = next_pos + 1
