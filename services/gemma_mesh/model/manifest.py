"""The bundle manifest (``manifest.json``): the contract between the exporter and every service.

Services read dtypes, shapes, token ids, layer layout and limits from here and nowhere else
(the manifest is the contract; docs/bundle.md); ``Manifest.model_validate`` refuses a bundle whose
format version or structure this code does not understand.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# 2: the decoder's ``present.N.key/value`` outputs hold the step's keys/values only (1: past + step).
BUNDLE_FORMAT_VERSION = 3

# The text of Gemma 4's control tokens, by role. Only the *strings* of the Gemma 4 format live here;
# their ids are always looked up in the checkpoint's tokenizer at export time.
GEMMA4_SPECIAL_TOKENS: dict[str, str] = {
    "unk": "<unk>",
    "mask": "<mask>",
    "turn_start": "<|turn>",
    "turn_end": "<turn|>",
    "think": "<|think|>",
    "channel_start": "<|channel>",
    "channel_end": "<channel|>",
    "tool_start": "<|tool>",
    "tool_end": "<tool|>",
    "tool_call_start": "<|tool_call>",
    "tool_call_end": "<tool_call|>",
    "tool_response_start": "<|tool_response>",
    "tool_response_end": "<tool_response|>",
    "string_delimiter": '<|"|>',
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Model):
    """One graph input or output: ``shape`` entries are ints or symbolic dimension names."""

    name: str
    dtype: str
    shape: list[int | str]


class GraphEntry(_Model):
    """One ONNX graph of the bundle and its measured parity with PyTorch at export time."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_abs_diff_vs_torch: float
    external_data: bool = False

    def input(self, name: str) -> TensorSpec:
        """Return the input called ``name``. Raises KeyError when the graph has none."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.file} has no input {name!r}")


class TextLayer(_Model):
    """A decoder layer: attention type, KV geometry and which layer's KV cache it reads."""

    type: str
    num_key_value_heads: int
    head_dim: int
    kv_source: int


class TextSection(_Model):
    """Decoder facts: sizes, layer layout, sliding window, KV-cache layout including shared-KV layers."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    hidden_size_per_layer_input: int
    sliding_window: int
    max_position_embeddings: int
    final_logit_softcapping: float | None
    use_bidirectional_attention: str | None = None
    layers: list[TextLayer]
    kv_layers: list[int]

    @model_validator(mode="after")
    def _layers_consistent(self) -> TextSection:
        if len(self.layers) != self.num_hidden_layers:
            raise ValueError(f"manifest lists {len(self.layers)} layers, expected {self.num_hidden_layers}")
        for i in self.kv_layers:
            if self.layers[i].kv_source != i:
                raise ValueError(f"layer {i} owns a KV cache but reads layer {self.layers[i].kv_source}'s")
        return self


class TokenEntry(_Model):
    text: str
    id: int


class VisionSection(_Model):
    patch_size: int
    pooling_kernel_size: int
    default_max_soft_tokens: int
    supported_soft_tokens: list[int]
    output_hidden_size: int


class VideoSection(_Model):
    max_soft_tokens_per_frame: int
    num_frames: int = 0


class AudioSection(_Model):
    sampling_rate: int
    feature_size: int
    ms_per_token: int
    max_soft_tokens: int
    max_samples: int
    frames_multiple: int = Field(
        4,
        description="a whole clip's frames are padded to this multiple: 4 frames per token x the "
        "tokens audio_conformer takes at a time (its attention chunk)",
    )


class Manifest(_Model):
    """The parsed ``manifest.json``. Unknown extra keys are kept (forward compatible within a version)."""

    format_version: int
    exporter: dict[str, Any]
    source: dict[str, Any]
    dtype: str
    weights: str
    graphs: dict[str, GraphEntry]
    text: TextSection
    special_tokens: dict[str, TokenEntry]
    stop_token_ids: list[int]
    vision: VisionSection
    video: VideoSection
    audio: AudioSection
    image_seq_length: int

    @model_validator(mode="after")
    def _version(self) -> Manifest:
        if self.format_version != BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"bundle format {self.format_version} is not supported (this gemma-mesh reads {BUNDLE_FORMAT_VERSION});"
                " re-export it with `gemma-mesh export`"
            )
        return self

    def token_id(self, role: str) -> int:
        """Id of the special token with ``role`` (``image``, ``boi``, ``turn_end``, ...). Raises KeyError."""
        return self.special_tokens[role].id
