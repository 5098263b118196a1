"""Wire models of the OpenAI-compatible API: requests, responses and errors (pydantic, types only).

Mirrors vLLM's ``vllm/entrypoints/openai/protocol.py``: one ``OpenAIBaseModel`` (``protocol_base``;
structured outputs and tools in ``protocol_tools``) that accepts and logs unknown fields (OpenAI adds fields often; a client newer than this gateway must keep working),
while known fields are type-checked, so a clearly wrong value is a 400. Fields follow the order of
the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat/create,
https://platform.openai.com/docs/api-reference/audio/createTranscription). Extensions that are not
OpenAI's (vLLM's) sit between ``--8<--`` markers, each with a description.

Thinking: Gemma 4 thinks when its chat template gets ``enable_thinking=True``. The switch is vLLM's
``chat_template_kwargs: {"enable_thinking": true}``; OpenAI's ``reasoning_effort`` is accepted
too (``none``/``minimal`` = off, ``low``/``medium``/``high`` = on, with the decoder's named
thought-token budgets ``thinking_budget_low/medium/high``; vLLM's ``thinking_token_budget`` sets
one explicitly). Default: off. Thoughts come back as ``reasoning_content`` (message and stream deltas) only when on.

Field limits and cross-field rules raise ``ValueError`` here (a 400 naming the parameter, through
the app's validation handler); checks needing server state (model name, token and media limits)
are in ``serving.py``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.mesh_types import PRIORITY_REQUEST, Sampling
from gemma_mesh.gateway.openai.protocol_base import OpenAIBaseModel, is_none
from gemma_mesh.gateway.openai.protocol_tools import (
    ChatCompletionNamedToolChoice,
    ChatCompletionToolParam,
    DeltaToolCall,
    ResponseFormat,
    ToolCall,
)

log = get_logger(__name__)

MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit
MAX_CHOICES = 8  # n: each choice is a decoder row
MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; the decoder checks every stop string each step
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "webm")
"""Containers ``input_audio.format`` may name (the file's header decides how it is decoded)."""
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


# --- models -----------------------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gemma-mesh"
    root: str | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# --- chat completions: request ----------------------------------------------------------------


class ChatCompletionContentPartText(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    url: str = Field(description="A base64 data URL (data:image/jpeg;base64,...); remote URLs are refused")
    detail: Literal["auto", "low", "high"] = Field(
        "auto",
        description="The vision soft-token budget: low = the encoder's smallest, high = its largest, "
        "auto = its default for images",
    )


class ChatCompletionContentPartImage(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(OpenAIBaseModel):
    url: str = Field(
        description="A base64 data URL (data:video/mp4;base64,... or video/webm); remote URLs are refused"
    )


class ChatCompletionContentPartVideo(OpenAIBaseModel):
    """vLLM's ``video_url`` part: frames sampled and encoded at the model's per-frame budget."""

    type: Literal["video_url"]
    video_url: VideoURL


class InputAudio(OpenAIBaseModel):
    data: str = Field(description="The encoded audio file, base64")
    format: Literal["wav", "mp3", "flac", "ogg", "webm"]


class ChatCompletionContentPartInputAudio(OpenAIBaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[
    ChatCompletionContentPartText
    | ChatCompletionContentPartImage
    | ChatCompletionContentPartInputAudio
    | ChatCompletionContentPartVideo,
    Field(discriminator="type"),
]


class ChatCompletionSystemMessage(OpenAIBaseModel):
    """``system`` or ``developer`` (OpenAI's newer name; both become Gemma's system turn)."""

    role: Literal["system", "developer"]
    content: str | list[ChatCompletionContentPartText]
    name: str | None = None


class ChatCompletionUserMessage(OpenAIBaseModel):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatCompletionAssistantMessage(OpenAIBaseModel):
    """A previous answer. ``reasoning_content`` is dropped (Gemma's template keeps no old thoughts)."""

    role: Literal["assistant"]
    content: str | list[ChatCompletionContentPartText] | None = None
    name: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionToolMessage(OpenAIBaseModel):
    role: Literal["tool"]
    content: str | list[ChatCompletionContentPartText]
    tool_call_id: str


ChatCompletionMessageParam = Annotated[
    ChatCompletionSystemMessage
    | ChatCompletionUserMessage
    | ChatCompletionAssistantMessage
    | ChatCompletionToolMessage,
    Field(discriminator="role"),
]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = Field(False, strict=True)


def _unsupported(name: str, why: str) -> ValueError:
    return ValueError(f"{name} is not supported by this server ({why})")


class PredictionContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class PredictionContent(OpenAIBaseModel):
    """OpenAI's predicted output: ``{"type": "content", "content": str | [{"type": "text", "text": str}]}``,
    the text the answer is expected to be (a file being edited, an earlier answer). The decoder
    prefills it after the prompt and keeps each token sampling picks anyway: the answer is the same
    as without it; accepted tokens cost a share of a prefill run instead of a decode step each.
    Usage reports ``accepted_prediction_tokens`` and ``rejected_prediction_tokens``."""

    type: Literal["content"]
    content: str | list[PredictionContentPart]

    @property
    def text(self) -> str:
        """The predicted text (parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIBaseModel):
    """``POST /v1/chat/completions``. Unsupported features with a non-default value are a 400."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    model: str | None = Field(None, description="The served model's id; None = the served model (vLLM)")
    audio: dict[str, Any] | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = Field(False, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    max_tokens: int | None = Field(
        None, ge=1, strict=True, description="Deprecated by OpenAI for max_completion_tokens"
    )
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    n: int | None = Field(1, strict=True)
    parallel_tool_calls: bool | None = Field(None, strict=True)
    prediction: PredictionContent | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, strict=True)
    service_tier: str | None = None
    stop: str | list[str] | None = None
    store: bool | None = Field(False, strict=True)
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoice | None = None
    tools: list[ChatCompletionToolParam] | None = Field(None, max_length=128)
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    user: str | None = None
    # --8<-- [start:chat-completion-extra-params]
    top_k: int | None = Field(
        None,
        ge=-1,
        le=2**31 - 1,
        strict=True,
        description="Sample from the k most likely tokens; 0 or -1 = all",
    )
    thinking_token_budget: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        strict=True,
        description="vLLM's: thought tokens before the decoder closes the thought channel (wins over reasoning_effort)",
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=2.0, description="vLLM's: > 1 discourages tokens of the prompt and the answer"
    )
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="vLLM's: drop tokens below min_p times the top probability"
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description='Chat template variables; only {"enable_thinking": bool} (Gemma 4 thinking) is supported',
    )
    # --8<-- [end:chat-completion-extra-params]

    # Sampling defaults when the request leaves a field out (OpenAI's, not the checkpoint's).
    _DEFAULT_SAMPLING_PARAMS: ClassVar[dict[str, Any]] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int | None) -> int | None:
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}], got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """OpenAI's form: token ids (as JSON object keys) -> bias in [-100, 100], at most 300."""
        if value:
            if len(value) > MAX_LOGIT_BIAS_TOKENS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(value)}")
            for key, bias in value.items():
                if not key.isdigit() or int(key) >= 2**31:
                    raise ValueError(f"keys must be token ids, got {key!r}")
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio_output(cls, value: dict | None) -> dict | None:
        if value is not None:
            raise _unsupported("audio output", "Gemma 4 answers in text")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value and set(value) != {"text"}:
            raise _unsupported(f"modalities {value}", 'only ["text"] can be generated')
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _only_thinking(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            unknown = sorted(set(value) - {"enable_thinking"})
            if unknown:
                raise ValueError(f"only enable_thinking is supported, got {unknown}")
            if not isinstance(value["enable_thinking"], bool):
                raise ValueError("enable_thinking must be true or false")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        explicit = (self.chat_template_kwargs or {}).get("enable_thinking")
        if explicit is not None and self.reasoning_effort is not None:
            if explicit != (self.reasoning_effort not in ("none", "minimal")):
                raise ValueError(
                    "reasoning_effort and chat_template_kwargs.enable_thinking disagree; send one of them"
                )
        return self

    @property
    def enable_thinking(self) -> bool:
        """Thinking on: ``chat_template_kwargs.enable_thinking``, else ``reasoning_effort`` low and up."""
        explicit = (self.chat_template_kwargs or {}).get("enable_thinking")
        if explicit is not None:
            return explicit
        return self.reasoning_effort not in (None, "none", "minimal")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens``, else the deprecated ``max_tokens``, else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling(self, max_tokens: int, default_sampling_params: dict[str, Any] | None = None) -> Sampling:
        """The decoder's sampling settings (as vLLM's ``to_sampling_params``); ``max_tokens`` already
        checked against the server's limit by serving."""
        defaults = {**self._DEFAULT_SAMPLING_PARAMS, **(default_sampling_params or {})}
        top_k = self.top_k if self.top_k is not None else defaults["top_k"]
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else defaults["temperature"],
            top_p=self.top_p if self.top_p is not None else defaults["top_p"],
            top_k=max(top_k, 0),
            seed=self.seed,
            stop=stop,
            enable_thinking=self.enable_thinking,
            priority=PRIORITY_REQUEST,
            prediction_text=self.prediction.text if self.prediction is not None else "",
            constraint=self.response_format.constraint() if self.response_format is not None else None,
            tools_json=json.dumps([t.model_dump(exclude_none=True) for t in self.tools])
            if self.tools
            else "",
            tool_choice=self._tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p or 0.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            thinking_token_budget=self.thinking_token_budget,
            reasoning_effort=self.reasoning_effort
            if self.reasoning_effort in ("low", "medium", "high")
            else "",
        )

    def check_tool_choice(self) -> None:
        """Raises InvalidRequest (param ``tool_choice``): a named function that is not among the
        tools, ``required`` without tools, a forced choice with a JSON ``response_format``."""
        names = [tool.function.name for tool in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, ChatCompletionNamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice: {choice.function.name!r} is not among the tools", param="tool_choice"
            )
        if choice == "required" and not names:
            raise InvalidRequest("tool_choice: 'required' needs tools", param="tool_choice")
        forced = choice == "required" or isinstance(choice, ChatCompletionNamedToolChoice)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(
                "tool_choice: a forced tool_choice cannot be combined with a JSON response_format",
                param="tool_choice",
            )

    def _tool_choice(self) -> str:
        """``decoder.proto`` ``tool_choice``: auto (the default with tools), none, required or a name."""
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ""


# --- chat completions: responses --------------------------------------------------------------


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = Field(None, exclude_if=is_none)


class ChatCompletionMessage(OpenAIBaseModel):
    """The answer; ``reasoning_content`` is present only when thinking was on."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = Field(None, exclude_if=is_none)
    tool_calls: list[ToolCall] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(OpenAIBaseModel):
    """One answer token: its text, log-probability, UTF-8 bytes and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    """One stream increment: only the fields that changed are sent (as OpenAI does)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=is_none)
    content: str | None = Field(None, exclude_if=is_none)
    reasoning_content: str | None = Field(None, exclude_if=is_none)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=is_none)


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    """One SSE chunk. With ``stream_options.include_usage`` every chunk carries ``usage: null`` and a
    last chunk with no choices carries the usage (OpenAI's convention)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = Field(None, exclude_if=is_none)


# --- audio: transcriptions and translations ---------------------------------------------------


class TranscriptionRequest(OpenAIBaseModel):
    """The multipart fields of ``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (not ``file``).

    ``prompt`` is the speech's context (earlier speech, names, terms), given to the model before the
    audio of every segment; without one a file is decoded exactly as live captions decode the same
    audio. ``temperature`` is validated; decoding is greedy (temperature 0), for that reason.
    ``stream`` (transcriptions only) answers Server-Sent Events: ``transcript.text.delta`` per
    segment, then ``transcript.text.done`` with the text and usage. ``language`` is the spoken language's hint
    (ISO-639-1 or BCP-47); OpenAI's translations have no ``language``, here it is an optional hint.
    """

    model: str | None = None
    language: str | None = Field(None, max_length=64)
    prompt: str | None = Field(None, max_length=4096)
    response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=lambda: ["segment"])
    stream: bool = False

    @field_validator("timestamp_granularities")
    @classmethod
    def _segments_only(cls, value: list[str]) -> list[str]:
        if "word" in value:
            raise _unsupported("word timestamps", "segments come from the VAD; words are not aligned")
        return value


class TranscriptTextDelta(OpenAIBaseModel):
    """An SSE event of a streamed transcription: the text of the next segment."""

    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTokenDetails(OpenAIBaseModel):
    audio_tokens: int
    text_tokens: int = 0


class TranscriptTokenUsage(OpenAIBaseModel):
    """``input_tokens``: the audio soft tokens read (the instruction's text tokens are not counted)."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: TranscriptTokenDetails


class TranscriptTextDone(OpenAIBaseModel):
    """The last SSE event of a streamed transcription: the whole text (the deltas joined) and usage."""

    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TranscriptTokenUsage


class TranscriptionUsage(OpenAIBaseModel):
    type: Literal["duration"] = "duration"
    seconds: int = Field(description="Audio seconds, rounded up")


class TranscriptionResponse(OpenAIBaseModel):
    text: str
    usage: TranscriptionUsage | None = None


class TranscriptionSegment(OpenAIBaseModel):
    """One VAD segment. ``start``/``end`` in seconds of the file; ``seek`` in 10 ms frames (Whisper's
    unit); ``avg_logprob`` is the mean log-probability of the segment's text tokens (Whisper also
    averages in its end token; here the stop token has none); ``no_speech_prob`` is null (no such
    head);
    ``compression_ratio`` is Whisper's (UTF-8 bytes / zlib-compressed bytes of the text)."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float | None = None
    compression_ratio: float = 0.0
    no_speech_prob: float | None = None


class TranscriptionResponseVerbose(OpenAIBaseModel):
    """``verbose_json``. ``language``: Whisper-style lowercase English name of the hint (or of
    English for translations), ``"unknown"`` without a hint (no language identification)."""

    task: Literal["transcribe", "translate"]
    language: str
    duration: float = Field(description="Seconds of audio in the file")
    text: str
    segments: list[TranscriptionSegment]
    usage: TranscriptionUsage | None = None
