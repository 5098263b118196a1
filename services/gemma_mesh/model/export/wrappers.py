"""Export-friendly ``torch.nn.Module`` views of the four Gemma 4 graphs.

Each wrapper calls transformers' own Gemma 4 modules (layers, norms, rotary embeddings, towers),
so the math is the reference's; only the orchestration around them changes where
``torch.export`` needs it:

- the decoder runs through a cache that keeps the past and the step apart (``StepCache``) and an
  attention that reads both without concatenating or repeating them (``split_kv_attention``,
  registered as an ``AttentionInterface``), with explicit boolean 4-D masks, one for
  full-attention layers and one for sliding layers, instead of transformers' ``DynamicCache``
  (whose sliding trim is Python branching that pins the past length, and whose concatenation
  would copy the whole KV cache on every step);
- the vision encoder returns the pooled features padded to the budget (``[B, max_soft_tokens, D]``,
  valid tokens first) instead of stripping padding with a data-dependent boolean index, and pools
  with a comparison matrix instead of ``one_hot`` with a symbolic class count.

Graph names and input/output names follow the Gemma 4 layout of transformers.js / onnx-community
(``embed_tokens``, ``vision_encoder``, ``decoder_model_merged``), except that the audio encoder is
two graphs: ``audio_subsample`` (the two subsampling convolutions, 1 token of left context) and
``audio_conformer`` (the conformer and the projection into the text space, ~31 tokens of left
context on the tiny model, 181 on E4B). A live stream then subsamples only its new frames and runs
the conformer on the cached embeddings of its window, instead of re-subsampling the whole window
(the convolutions were ~55 % of a streaming step on the tiny model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface


class EmbedTokens(nn.Module):
    """``input_ids [B, S] int64 -> inputs_embeds [B, S, H], per_layer_inputs [B, S, L, P]``.

    ``inputs_embeds`` is the scaled token embedding (``Gemma4TextScaledWordEmbedding``, times
    sqrt(H)); ``per_layer_inputs`` is the token-identity half of the per-layer embeddings
    (``Gemma4TextModel.get_per_layer_inputs``). Callers replace multimodal placeholder ids by the
    pad id before calling, as ``Gemma4Model.forward`` does.
    """

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = text_model.embed_tokens
        self.embed_tokens_per_layer = text_model.embed_tokens_per_layer
        self.num_layers = text_model.config.num_hidden_layers
        self.per_layer_dim = text_model.config.hidden_size_per_layer_input

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs_embeds = self.embed_tokens(input_ids)
        per_layer = self.embed_tokens_per_layer(input_ids)
        per_layer = per_layer.reshape(
            input_ids.shape[0], input_ids.shape[1], self.num_layers, self.per_layer_dim
        )
        return inputs_embeds, per_layer


class StepCache:
    """The cache ``Gemma4TextAttention`` writes to during one step: the past and the step's keys/values
    are kept apart, so the graph never copies the past (no ``concat(past, new)``).

    ``update`` records the step's keys/values (the graph's ``present`` outputs) and returns them;
    ``split_kv_attention`` reads the past of the layer (for a KV-shared layer: of the layer that
    stores its type's keys, as transformers' ``shared_kv_states`` does) with ``past_for``.

    Args:
        past: ``{layer_idx: (key [B, kvH, T, D], value [B, kvH, T, D])}`` for layers that own a cache.
        layer_types: ``config.layer_types``.
        kv_sharing_modes: ``config.kv_sharing_modes`` ("reuse" layers read the "store" layer of their type).
    """

    def __init__(
        self,
        past: dict[int, tuple[torch.Tensor, torch.Tensor]],
        layer_types: list[str],
        kv_sharing_modes: list[str],
    ) -> None:
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._store = {layer_types[i]: i for i, mode in enumerate(kv_sharing_modes) if mode == "store"}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.present[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def past_for(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The past keys/values the attention ``module`` attends to besides the step's own."""
        idx = self._store[module.layer_type] if module.is_kv_shared_layer else module.layer_idx
        return self.past[idx]


SPLIT_KV_ATTENTION = "gemma_mesh_split_kv"


def split_kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    step_cache: StepCache,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Grouped-query attention over ``past ++ step`` without materialising either concatenation.

    Matches transformers' Gemma 4 ``eager_attention_forward`` (scores scaled, optional softcap,
    additive mask, softmax in fp32, then weighted values), but
    - the query heads of each KV head are folded into the query axis (``[B, kvH, G*S, D]``), so keys
      and values are read once per KV head instead of being repeated ``G`` times (``repeat_kv``);
    - the scores against the past ``[.., T]`` and against the step's keys ``[.., S]`` are computed
      separately and joined (the scores are small; the KV cache is not copied), and the output is
      ``P_past @ V_past + P_step @ V_step``.

    Args:
        query: ``[B, H, S, D]``; key, value: the step's ``[B, kvH, S, D]``.
        attention_mask: additive ``[B, 1, S, T + S]`` (past keys first, then the step's).
        step_cache: where the layer's past ``[B, kvH, T, D]`` comes from.

    Returns:
        ``(attn_output [B, S, H, D], None)``.
    """
    past_key, past_value = step_cache.past_for(module)
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if scaling is None:
        scaling = module.head_dim**-0.5
    q = query.reshape(batch, kv_heads, groups * seq, dim)
    scores = torch.cat([q @ past_key.transpose(2, 3), q @ key.transpose(2, 3)], dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.reshape(batch, kv_heads, groups, seq, -1) + attention_mask[:, :, None]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs.reshape(batch, kv_heads, groups * seq, -1)
    past = past_key.shape[2]
    out = probs[..., :past] @ past_value + probs[..., past:] @ value  # [B, kvH, G*S, D]
    return out.reshape(batch, heads, seq, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(SPLIT_KV_ATTENTION, split_kv_attention)


class DecoderWithPast(nn.Module):
    """One prefill or decode step of the Gemma 4 text decoder with an external KV cache.

    Inputs (in order): ``inputs_embeds [B, S, H]``, ``per_layer_inputs [B, S, L, P]``,
    ``attention_mask [B, 1, S, T_full] bool`` (True = attend, for full-attention layers),
    ``sliding_attention_mask [B, 1, S, T_sliding] bool`` (for sliding layers), ``position_ids [B, S]
    int64``, ``logits_indices [B, K] int64`` (the step positions ``0 .. S-1`` whose logits are
    wanted: a prefill needs only its last token's, as transformers' ``logits_to_keep``), then
    ``past_key_values.{i}.key/value [B, kvH_i, T, D_i]`` for every layer ``i`` that owns a cache
    (``kv_layers``; KV-shared layers reuse their producer's keys). ``T`` is the past plus ``S``; the
    caller decides what the sliding layers keep (the whole past, or the window).

    Outputs: ``logits [B, K, V]`` (after final softcapping; the final norm and the LM head run only
    on those ``K`` positions) and ``present.{i}.key/value [B, kvH_i, S, D_i]``: the step's own
    keys/values only. The caller writes them into its cache; the graph never
    copies the past (a decode step's cost does not grow with a copy of the whole cache).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        lm = model.model.language_model
        self.lm = lm
        self.lm_head = model.lm_head
        cfg = lm.config
        self.layer_types = list(cfg.layer_types)
        self.softcap = cfg.final_logit_softcapping
        self.has_ple = bool(cfg.hidden_size_per_layer_input)
        modes = cfg.kv_sharing_modes
        self.kv_layers = [i for i, mode in enumerate(modes) if mode != "reuse"]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        per_layer_inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        sliding_attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_indices: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        lm = self.lm
        dtype = inputs_embeds.dtype
        neg = torch.finfo(dtype).min
        zero = torch.zeros((), dtype=dtype)
        masks = {
            "full_attention": torch.where(attention_mask, zero, torch.full((), neg, dtype=dtype)),
            "sliding_attention": torch.where(sliding_attention_mask, zero, torch.full((), neg, dtype=dtype)),
        }
        per_layer = lm.project_per_layer_inputs(inputs_embeds, per_layer_inputs) if self.has_ple else None
        position_embeddings = {
            t: lm.rotary_emb(inputs_embeds, position_ids, t) for t in sorted(set(self.layer_types))
        }
        cache = StepCache(
            {idx: (past[2 * n], past[2 * n + 1]) for n, idx in enumerate(self.kv_layers)},
            self.layer_types,
            list(lm.config.kv_sharing_modes),
        )
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hidden = inputs_embeds
        previous, lm.config._attn_implementation = lm.config._attn_implementation, SPLIT_KV_ATTENTION
        try:
            for i, layer in enumerate(lm.layers):
                layer_type = self.layer_types[i]
                hidden = layer(
                    hidden,
                    per_layer[:, :, i, :] if per_layer is not None else None,
                    shared_kv_states=shared,
                    position_embeddings=position_embeddings[layer_type],
                    attention_mask=masks[layer_type],
                    position_ids=position_ids,
                    past_key_values=cache,
                    step_cache=cache,  # reaches split_kv_attention through the layers' **kwargs
                )
        finally:
            lm.config._attn_implementation = previous
        index = logits_indices[:, :, None].expand(-1, -1, hidden.shape[-1])
        hidden = lm.norm(torch.gather(hidden, 1, index))
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        presents: list[torch.Tensor] = []
        for idx in self.kv_layers:
            presents.extend(cache.present[idx])
        return (logits, *presents)


class AudioSubsample(nn.Module):
    """``input_features [B, T, F] float, input_features_mask [B, T] bool ->
    audio_embeddings [B, T/4, Ha], audio_embeddings_mask [B, T/4] bool``.

    ``Gemma4AudioSubSampleConvProjection`` (two stride-2 3x3 convolutions, LayerNorm, ReLU, and the
    input projection), the first step of ``Gemma4AudioModel.forward``. ``T`` must be a multiple of 4.
    Embedding ``u`` reads frames ``4u - 3 .. 4u + 3`` only, so a window that starts one token early
    gives the whole clip's embeddings from its second token on.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.subsample = model.model.audio_tower.subsample_conv_projection

    def forward(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.subsample(input_features, input_features_mask)


class _Subsampled(nn.Module):
    """Stands in for the subsampling inside ``Gemma4AudioModel.forward``: its input already is."""

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden_states, mask


class AudioConformer(nn.Module):
    """``audio_embeddings [B, U, Ha] float, audio_embeddings_mask [B, U] bool -> audio_features [B, U, H]``.

    The rest of ``Gemma4AudioModel.forward`` after the subsampling (relative positions, the blocked
    local-attention mask, the conformer layers, ``output_proj``), run by transformers' own forward
    on a view of the tower whose subsampling is the identity, then ``embed_audio``
    (``Gemma4MultimodalEmbedder``), as ``Gemma4Model.get_audio_features`` computes it. ``U`` must be
    a multiple of the attention chunk (12); callers pad with masked tokens, which leaves the valid
    outputs unchanged. Output rows past the valid count are padding.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        tower = model.model.audio_tower
        view = object.__new__(type(tower))  # shares every parameter; only its _modules dict is its own
        view.__dict__.update(tower.__dict__)
        view._modules = {**tower._modules, "subsample_conv_projection": _Subsampled()}
        self.tower = view
        self.embed = model.model.embed_audio

    def forward(self, audio_embeddings: torch.Tensor, audio_embeddings_mask: torch.Tensor) -> torch.Tensor:
        out = self.tower(audio_embeddings, audio_embeddings_mask, return_dict=True)
        return self.embed(out.last_hidden_state)


class VisionEncoder(nn.Module):
    """``pixel_values [B, N, 3*p*p], pixel_position_ids [B, N, 2] int64 -> image_features [B, N/k^2, H]``.

    ``Gemma4VisionModel`` + ``embed_vision`` as ``Gemma4Model.get_image_features`` computes them, with
    the pooled features kept padded: row ``j < num_soft_tokens`` of image ``b`` is its ``j``-th soft
    token; rows past it are padding.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower = model.model.vision_tower
        self.embed = model.model.embed_vision
        cfg = self.tower.config
        self.k = cfg.pooling_kernel_size
        self.root_hidden = cfg.hidden_size**0.5
        self.standardize = bool(cfg.standardize)

    def _pool(self, hidden: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        # Matches Gemma4VisionPooler._avg_pool_by_positions: average each k x k block of patches.
        k = self.k
        clamped = positions.clamp(min=0)
        max_x = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
        kernel = torch.div(clamped, k, rounding_mode="floor")
        kernel = kernel[..., 0] + torch.div(max_x, k, rounding_mode="floor") * kernel[..., 1]
        slots = torch.arange(length, device=hidden.device)
        weights = (kernel[..., None] == slots).to(torch.float32) / (k * k)  # [B, N, L]
        return weights.transpose(1, 2) @ hidden.float()

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        length = pixel_values.shape[-2] // (self.k * self.k)
        padding = (pixel_position_ids == -1).all(dim=-1)
        embeds = tower.patch_embedder(pixel_values, pixel_position_ids, padding)
        out = tower.encoder(
            inputs_embeds=embeds, attention_mask=~padding, pixel_position_ids=pixel_position_ids
        )
        hidden = out.last_hidden_state.masked_fill(padding.unsqueeze(-1), 0.0)
        pooled = self._pool(hidden, pixel_position_ids, length) * self.root_hidden
        if self.standardize:
            pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
        return self.embed(pooled.to(embeds.dtype))
