"""make-tiny keeps E4B's KV-sharing shape in every preset: the cache-owning layers end with a
sliding layer then a full one, and each shared layer reads the last cache-owning layer of its type,
which is the layer llama.cpp's Gemma 4 loader picks (``n_layer_kv_from_start - 2`` for a sliding
layer, ``- 1`` for a full one, ``llama-model.cpp``)."""

from __future__ import annotations

import pytest
from transformers import Gemma4TextConfig

from gemma_mesh.model.tiny import PRESETS, _layer_types, build_config, check_kv_sharing_layout

TOKEN_IDS = dict.fromkeys(("pad", "bos", "eos", "boi", "eoi", "image", "video", "boa", "eoa", "audio"), 0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shared_layers_reuse_the_layers_llama_cpp_assumes(name: str):
    text = Gemma4TextConfig(**build_config(PRESETS[name], TOKEN_IDS)["text_config"])
    modes = text.kv_sharing_modes
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    assert (
        modes[:first_shared].count("reuse") == 0
        and modes[first_shared:] == ["reuse"] * text.num_kv_shared_layers
    )
    # transformers: each type's producer is the last cache-owning layer of that type.
    producers = {text.layer_types[i]: i for i, mode in enumerate(modes) if mode == "store"}
    # llama.cpp: a shared layer reuses n_layer_kv_from_start - (2 if sliding else 1).
    assert producers == {"sliding_attention": first_shared - 2, "full_attention": first_shared - 1}
    assert {text.layer_types[i] for i in range(first_shared, text.num_hidden_layers)} == set(producers)


def test_the_e4b_preset_has_e4bs_layout():
    e4b = PRESETS["e4b"]
    types = _layer_types(e4b.num_hidden_layers, e4b.full_attention_period)
    assert (e4b.num_hidden_layers, e4b.num_kv_shared_layers) == (42, 18)
    assert (types[22], types[23], types[41]) == ("sliding_attention", "full_attention", "full_attention")


def test_a_layout_ending_its_cache_owning_region_on_a_sliding_layer_is_refused():
    types = _layer_types(6, 3)  # s s F s s F
    check_kv_sharing_layout(types, 3)
    with pytest.raises(ValueError, match="must end with a sliding then a full layer"):
        check_kv_sharing_layout(types, 2)  # layers 0..3 own caches and end full, sliding
    with pytest.raises(ValueError, match="must end with a sliding then a full layer"):
        check_kv_sharing_layout(types, 5)  # one owning layer
    with pytest.raises(ValueError, match="both attention types"):
        check_kv_sharing_layout(["sliding_attention", "full_attention", "full_attention"], 1)
