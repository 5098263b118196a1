"""The values the gateway exchanges with the mesh's clients (``gateway.clients``): chat messages and
their parts, sampling settings, scheduling priorities, streamed deltas and the finished answer,
audio and image soft tokens. Plain dataclasses: no gRPC here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gemma_mesh.proto.v1 import decoder_pb2

SoftTokens = decoder_pb2.SoftTokens


@dataclass
class Part:
    """One content part of a message: text, or soft tokens from an encoder (kept as protobuf)."""

    text: str | None = None
    soft_tokens: SoftTokens | None = None


@dataclass
class ChatMessage:
    """A chat message for ``Decoder.Generate``: role and content parts in order."""

    role: str
    parts: list[Part]
    # Tool calling (decoder.proto Message): an assistant turn's calls (OpenAI JSON array text);
    # a tool result's call id and function name.
    tool_calls_json: str = ""
    tool_call_id: str = ""
    name: str = ""


@dataclass
class Sampling:
    """Sampling settings of one generation (``decoder.proto`` ``SamplingParams`` + limits)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    enable_thinking: bool = False
    prefix_cache_key: str = ""
    priority: int = 0  # the decoder admits lower values first (PRIORITY_* below)
    # Predicted output (decoder.proto Prediction): the expected answer's token ids, or its text.
    prediction_ids: Sequence[int] = ()
    prediction_text: str = ""
    # Answer deltas arrive once they carry this many tokens (or at the end); 0 = every step.
    stream_interval_tokens: int = 0
    # Structured output (decoder.proto Constraint): (kind, text), kind json_schema/json_object/regex/lark.
    constraint: tuple[str, str] | None = None
    # Tools (decoder.proto GenerateRequest.tools_json / tool_choice / parallel_tool_calls).
    tools_json: str = ""
    tool_choice: str = ""
    parallel_tool_calls: bool | None = None
    # Log-probabilities (decoder.proto GenerateRequest.logprobs): None = none, N = top N too.
    logprobs: int | None = None
    # Logit processors (decoder.proto SamplingParams): OpenAI's penalties and logit_bias, vLLM's
    # repetition_penalty (None = off) and min_p.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Thinking budget (decoder.proto): explicit tokens, or a named effort (low/medium/high).
    thinking_token_budget: int | None = None
    reasoning_effort: str = ""


# Decoder scheduling priorities (lower is admitted first): a live caption is waited on by a person
# reading along; a frame analysis or an API request can wait one step longer.
PRIORITY_LIVE_CAPTION = 0
PRIORITY_REQUEST = 1
PRIORITY_FRAME_ANALYSIS = 2


@dataclass
class Delta:
    """Streamed text: ``channel`` is ``answer`` or ``reasoning``."""

    text: str
    token_ids: list[int]
    channel: str
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when asked


@dataclass
class TokenLogprobs:
    """A generated token's text, bytes and log-probability, and the most likely tokens' (same form)."""

    token: str
    token_bytes: bytes
    logprob: float
    top: list[tuple[str, bytes, float]] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """A tool call's stream delta (decoder.proto ToolCallDelta): id and name first, then arguments."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass
class Answer:
    """The answer channel of one generation: its text, token ids and completion token count."""

    text: str
    token_ids: list[int]
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)  # per answer token, when the sampling asked


@dataclass
class Done:
    """The end of a generation: finish reason (``stop``/``length``), usage and timings (ms)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_ms: float
    total_ms: float
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


@dataclass
class AudioSegment:
    """Audio soft tokens of one segment of a clip and where it lies in the clip (ms)."""

    soft_tokens: SoftTokens
    start_ms: int
    end_ms: int


@dataclass
class ImageSoftTokens:
    """Vision soft tokens of one image and its size in pixels."""

    soft_tokens: SoftTokens
    width: int
    height: int
    extras: dict = field(default_factory=dict)
