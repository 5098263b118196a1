"""``Decoder.Generate``: protobuf request -> prompt (chat template + soft tokens) -> engine -> streamed deltas.

Validation of shape happens here, at the edge (the request is refused before it is queued); limits that need the model (context
length) are checked by the engine. Errors are ``InvalidRequest``/``Overloaded``; the interceptor maps
them to INVALID_ARGUMENT/RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from gemma_mesh.common.errors import EngineDead, InvalidRequest
from gemma_mesh.common.tensors import from_tensor_pb
from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest
from gemma_mesh.decoder.grammar import CompiledGrammar, ConstraintSpec, GrammarCompiler
from gemma_mesh.decoder.output import Channel, Delta, FinishReason
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.decoder.tools import ToolCallStream, message_extras, parse_tools
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.model.manifest import Manifest
from gemma_mesh.model.sampling import SamplingParams
from gemma_mesh.proto.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

MAX_STOP_STRING_CHARS = 256
# Largest GenerateRequest.stream_interval_tokens: a caller holding deltas longer than that wants
# the whole answer; it still arrives, only in one message.
MAX_STREAM_INTERVAL_TOKENS = 256
_MODALITY_ROLE = {common_pb2.IMAGE: "image", common_pb2.AUDIO: "audio", common_pb2.VIDEO: "video"}
_CHANNEL = {Channel.ANSWER: decoder_pb2.ANSWER, Channel.REASONING: decoder_pb2.REASONING}
_FINISH = {FinishReason.STOP: decoder_pb2.STOP, FinishReason.LENGTH: decoder_pb2.LENGTH}
_NO_TOOL_CALLS: tuple[str, list] = ("", [])


def sampling_from_pb(pb: decoder_pb2.SamplingParams, manifest: Manifest) -> SamplingParams:
    """``SamplingParams`` from the request (unset top_p = 1, repetition_penalty = 1; temperature 0 =
    greedy).

    Raises:
        InvalidRequest: temperature < 0 or not finite, top_p outside (0, 1], top_k < 0, a penalty,
            min_p or bias out of range, a logit_bias token outside the vocabulary.
    """
    top_p = pb.top_p if pb.HasField("top_p") else 1.0
    if not math.isfinite(pb.temperature):
        raise InvalidRequest("temperature must be a finite number", param="sampling.temperature")
    vocab = manifest.text.vocab_size
    bad = [t for t in pb.logit_bias if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(
            f"logit_bias names token {bad[0]}, outside the vocabulary [0, {vocab})",
            param="sampling.logit_bias",
        )
    return SamplingParams(
        temperature=float(pb.temperature),
        top_k=int(pb.top_k),
        top_p=float(top_p),
        seed=int(pb.seed) if pb.HasField("seed") else None,
        presence_penalty=float(pb.presence_penalty),
        frequency_penalty=float(pb.frequency_penalty),
        repetition_penalty=float(pb.repetition_penalty) if pb.HasField("repetition_penalty") else 1.0,
        min_p=float(pb.min_p),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in pb.logit_bias.items())),
    )


def constraint_from_pb(
    pb: decoder_pb2.Constraint, grammars: GrammarCompiler, settings: DecoderSettings
) -> CompiledGrammar:
    """Compile the request's constraint (or take it from the compiler's cache).

    Raises:
        InvalidRequest: no kind set, text over ``max_constraint_chars``, or a constraint llguidance
            rejects (its message says what and where), naming ``constraint.<kind>``.
    """
    kind = pb.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(
            "constraint: set one of json_schema, json_object, regex, lark", param="constraint"
        )
    text = "" if kind == "json_object" else getattr(pb, kind)
    if len(text) > settings.max_constraint_chars:
        raise InvalidRequest(
            f"constraint.{kind} has {len(text)} characters; the limit is {settings.max_constraint_chars} "
            "(max_constraint_chars)",
            param=f"constraint.{kind}",
        )
    return grammars.compile(ConstraintSpec(kind, text), param=f"constraint.{kind}")


def build_request(
    pb: decoder_pb2.GenerateRequest,
    bundle: ModelBundle,
    settings: DecoderSettings,
    grammars: GrammarCompiler,
) -> GenerationRequest:
    """Render the conversation with the bundle's chat template and attach the soft tokens; compile
    the constraint with ``grammars`` (the engine's compiler).

    Raises:
        InvalidRequest: no messages, an empty part, a soft-token tensor of the wrong shape or dtype,
            video frames that do not add up, bad sampling settings or stop strings, an unknown role
            (from the prompt builder), an invalid constraint (``constraint_from_pb``).
    """
    manifest = bundle.manifest
    if not pb.messages:
        raise InvalidRequest("messages is empty", param="messages")
    hidden = manifest.text.hidden_size
    messages: list[dict[str, Any]] = []
    counts: dict[str, list[int]] = {"image": [], "audio": []}
    video_frames: list[list[tuple[float, int]]] = []
    soft: list[tuple[int, np.ndarray]] = []
    for m, msg in enumerate(pb.messages):
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(msg.content):
            where = f"messages[{m}].content[{p}]"
            kind = part.WhichOneof("kind")
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if kind != "soft_tokens":
                raise InvalidRequest(f"{where} is empty (neither text nor soft_tokens)", param=where)
            st = part.soft_tokens
            role = _MODALITY_ROLE.get(st.modality)
            if role is None:
                raise InvalidRequest(
                    f"{where}.soft_tokens.modality must be IMAGE, AUDIO or VIDEO", param=where
                )
            tokens = from_tensor_pb(st.tokens, param=f"{where}.soft_tokens.tokens")
            if tokens.ndim != 2 or tokens.shape[1] != hidden or tokens.shape[0] == 0:
                raise InvalidRequest(
                    f"{where}.soft_tokens.tokens must have shape [n > 0, {hidden}], got {list(tokens.shape)}",
                    param=where,
                )
            if not np.issubdtype(tokens.dtype, np.floating):
                raise InvalidRequest(f"{where}.soft_tokens.tokens must be float16 or float32", param=where)
            if role == "audio" and tokens.shape[0] > manifest.audio.max_soft_tokens:
                raise InvalidRequest(
                    f"{where}: {tokens.shape[0]} audio soft tokens exceed the limit of {manifest.audio.max_soft_tokens}"
                    " (30 s); segment the audio",
                    param=where,
                )
            if role == "video":
                frames = [(float(f.timestamp_s), int(f.num_soft_tokens)) for f in st.frames]
                if not frames or sum(n for _, n in frames) != tokens.shape[0]:
                    raise InvalidRequest(
                        f"{where}: video frames declare {sum(n for _, n in frames)} soft tokens, the tensor has "
                        f"{tokens.shape[0]}",
                        param=where,
                    )
                video_frames.append(frames)
            else:
                counts[role].append(int(tokens.shape[0]))
            parts.append({"type": role})
            soft.append((manifest.token_id(role), tokens.astype(bundle.float_dtype, copy=False)))
        messages.append({"role": msg.role, "content": parts, **message_extras(msg, f"messages[{m}]")})
    if len(pb.stop) > settings.max_stop_strings or any(len(s) > MAX_STOP_STRING_CHARS for s in pb.stop):
        raise InvalidRequest(
            f"at most {settings.max_stop_strings} stop strings of at most {MAX_STOP_STRING_CHARS} characters",
            param="stop",
        )
    tools = parse_tools(pb, manifest)
    prompt = bundle.prompt_builder.build(
        messages,
        tools=tools.tools,
        image_soft_tokens=counts["image"],
        audio_soft_tokens=counts["audio"],
        video_frames=video_frames,
        enable_thinking=pb.enable_thinking,
    )
    if not 0 <= pb.stream_interval_tokens <= MAX_STREAM_INTERVAL_TOKENS:
        raise InvalidRequest(
            f"stream_interval_tokens must be in [0, {MAX_STREAM_INTERVAL_TOKENS}], got {pb.stream_interval_tokens}",
            param="stream_interval_tokens",
        )
    # The builder numbers media per kind in message order; embed_prompt fills each placeholder id in order.
    prediction = (
        prediction_from_pb(pb.prediction, bundle, int(pb.max_tokens)) if pb.HasField("prediction") else None
    )
    constraint = constraint_from_pb(pb.constraint, grammars, settings) if pb.HasField("constraint") else None
    if tools.grammar:  # tool_choice required or named: the calls are forced
        constraint = grammars.compile(ConstraintSpec("lark", tools.grammar), param="tools_json")
    return GenerationRequest(
        request_id=pb.request_id,
        input_ids=prompt.input_ids,
        soft_tokens=soft,
        sampling=sampling_from_pb(pb.sampling, manifest),
        max_tokens=int(pb.max_tokens),
        stop=list(pb.stop),
        enable_thinking=pb.enable_thinking,
        prefix_cache_key=pb.prefix_cache_key,
        ignore_eos=pb.ignore_eos,
        priority=pb.priority,
        prediction=prediction,
        stream_interval_tokens=max(1, pb.stream_interval_tokens),
        constraint=constraint,
        keep_tool_call_markers=tools.parse,
        logprobs=logprobs_from_pb(pb),
        thinking_token_budget=thinking_budget_from_pb(pb, settings),
    )


MAX_TOP_LOGPROBS = 20  # OpenAI's limit
REASONING_EFFORTS = ("low", "medium", "high")


def thinking_budget_from_pb(pb: decoder_pb2.GenerateRequest, settings: DecoderSettings) -> int | None:
    """The thought-token budget: ``thinking_token_budget``, else the setting named by
    ``reasoning_effort``, else None (no limit).

    Raises:
        InvalidRequest: a negative budget, an unknown effort.
    """
    if pb.HasField("thinking_token_budget"):
        if pb.thinking_token_budget < 0:
            raise InvalidRequest(
                f"thinking_token_budget must be >= 0, got {pb.thinking_token_budget}",
                param="thinking_token_budget",
            )
        return int(pb.thinking_token_budget)
    if not pb.reasoning_effort:
        return None
    if pb.reasoning_effort not in REASONING_EFFORTS:
        raise InvalidRequest(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {pb.reasoning_effort!r}",
            param="reasoning_effort",
        )
    return int(getattr(settings, f"thinking_budget_{pb.reasoning_effort}"))


def logprobs_from_pb(pb: decoder_pb2.GenerateRequest) -> int | None:
    """``GenerateRequest.logprobs`` (None when unset). Raises InvalidRequest outside [0, 20]."""
    if not pb.HasField("logprobs"):
        return None
    if not 0 <= pb.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {pb.logprobs}", param="logprobs"
        )
    return int(pb.logprobs)


@functools.lru_cache(maxsize=65536)
def _token_pb(bundle: ModelBundle, token_id: int) -> tuple[str, bytes]:
    """A token's text and bytes for log-probabilities: byte-fallback tokens (``<0xHH>``) are their
    byte; others their vocabulary piece decoded (special tokens kept by name)."""
    piece = bundle.tokenizer.id_to_token(token_id) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        raw = bytes([int(piece[3:5], 16)])
        return raw.decode("utf-8", errors="replace"), raw
    text = bundle.tokenizer.decode([token_id], skip_special_tokens=False)
    return text, text.encode()


def logprobs_pb(bundle: ModelBundle, entries: list, stops: frozenset[int]) -> list[decoder_pb2.TokenLogprobs]:
    """``model.sampling.TokenLogprob`` entries -> ``TokenLogprobs`` messages, without the stop
    tokens' (they end the answer and are not part of it, as in OpenAI's and vLLM's)."""

    def one(token_id: int, logprob: float) -> decoder_pb2.TokenLogprob:
        text, raw = _token_pb(bundle, token_id)
        return decoder_pb2.TokenLogprob(token_id=token_id, token=text, token_bytes=raw, logprob=logprob)

    return [
        decoder_pb2.TokenLogprobs(chosen=one(e.token_id, e.logprob), top=[one(i, lp) for i, lp in e.top])
        for e in entries
        if e.token_id not in stops
    ]


@functools.lru_cache(maxsize=8)
def max_token_chars(bundle: ModelBundle) -> int:
    """The longest token's length in its vocabulary spelling (an upper bound of the characters any
    one token decodes to: byte tokens ``<0x..>`` and byte-level symbols spell at least one
    character per character they decode to)."""
    return max(len(token) for token in bundle.tokenizer.get_vocab())


def prediction_from_pb(pb: decoder_pb2.Prediction, bundle: ModelBundle, max_tokens: int) -> np.ndarray | None:
    """The predicted output's token ids (int64 ``[m]``, at most ``max_tokens``): given, or the text
    tokenized without special tokens. None when both are empty.

    Only the first ``max_tokens - 1`` predicted tokens can ever be used, so a long text is cut to
    ``max_tokens * max_token_chars`` characters before it is tokenized: the tokenizer's work is
    bounded by the request's ``max_tokens``, not by the prediction's size (a 10 MB prediction took
    seconds of the event loop every stream shares). Cutting can only change the tokens at the cut,
    past the ones used; a prediction never changes the output anyway.

    Raises:
        InvalidRequest: both token ids and text, or a token id outside the vocabulary.
    """
    if pb.token_ids and pb.text:
        raise InvalidRequest("prediction: give token_ids or text, not both", param="prediction")
    if pb.text:
        text = pb.text[: max(max_tokens, 1) * max_token_chars(bundle)]
        ids = bundle.tokenizer.encode(text, add_special_tokens=False).ids[: max(max_tokens, 1)]
        return np.asarray(ids, dtype=np.int64)
    if not pb.token_ids:
        return None
    ids = np.asarray(pb.token_ids[: max(max_tokens, 1)], dtype=np.int64)
    vocab = bundle.manifest.text.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InvalidRequest(
            f"prediction.token_ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}",
            param="prediction",
        )
    return ids


def finished_pb(event: Finished) -> decoder_pb2.GenerateResponse:
    usage = common_pb2.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
        cached_prompt_tokens=event.cached_prompt_tokens,
        accepted_prediction_tokens=event.accepted_prediction_tokens,
        rejected_prediction_tokens=event.rejected_prediction_tokens,
    )
    timings = decoder_pb2.Timings(
        ttft_ms=event.ttft_s * 1000,
        decode_tokens_per_s=event.decode_tokens_per_s,
        queue_ms=event.queue_s * 1000,
        total_ms=event.total_s * 1000,
    )
    return decoder_pb2.GenerateResponse(
        finished=decoder_pb2.Finished(reason=_FINISH[event.reason], usage=usage, timings=timings)
    )


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    """The gRPC face of an ``Engine`` (None while it loads: calls get UNAVAILABLE)."""

    def __init__(self, engine: Engine | None, settings: DecoderSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def Generate(
        self, request: decoder_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        if self.engine is None:
            raise EngineDead("the decoder is still loading")
        try:
            # Off the event loop: rendering and tokenizing a long prompt must not stall the other
            # streams this loop serves.
            # Compiling a new constraint happens here too (llguidance drops the GIL while it compiles).
            gen = await asyncio.to_thread(
                build_request, request, self.engine.bundle, self.settings, self.engine.grammars
            )
            handle = self.engine.submit(gen)
        except Exception as exc:
            code = getattr(exc, "grpc_status", "INTERNAL")
            self.engine.metrics.errors.labels(code).inc()
            raise
        # With tools, calls are parsed out of the answer text (its markers kept for that).
        stops = frozenset(self.engine.bundle.manifest.stop_token_ids)
        calls = ToolCallStream(
            self.engine.bundle.manifest,
            parallel=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
        )
        try:
            async for event in handle.events():
                if isinstance(event, Delta):
                    text, tool_calls = event.text, []
                    if gen.keep_tool_call_markers and event.channel == Channel.ANSWER:
                        text, tool_calls = calls.feed(text)
                    yield decoder_pb2.GenerateResponse(
                        delta=decoder_pb2.TextDelta(
                            text=text,
                            token_ids=event.token_ids,
                            channel=_CHANNEL[event.channel],
                            tool_calls=tool_calls,
                            logprobs=logprobs_pb(self.engine.bundle, event.logprobs, stops),
                        )
                    )
                else:
                    text, tool_calls = calls.finish() if gen.keep_tool_call_markers else _NO_TOOL_CALLS
                    if text or tool_calls:
                        yield decoder_pb2.GenerateResponse(
                            delta=decoder_pb2.TextDelta(
                                text=text, channel=decoder_pb2.ANSWER, tool_calls=tool_calls
                            )
                        )
                    response = finished_pb(event)
                    if calls.made and response.finished.reason == decoder_pb2.STOP:
                        response.finished.reason = decoder_pb2.TOOL_CALLS
                    yield response
        finally:
            handle.cancel()  # a no-op once finished; frees the row if the client went away
