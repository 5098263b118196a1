"""The OpenAI-compatible API's logic: chat completions and models (audio files: ``serving_transcription``).

Mirrors vLLM's ``OpenAIServingChat`` and ``OpenAIServingModels`` (``vllm/entrypoints/openai/``):
each handler takes a parsed request and returns a response model or an async generator of SSE
lines; it never builds HTTP responses (``router.py`` does). Errors are the mesh's classes (``common.errors``), which the
app turns into OpenAI error bodies with their HTTP status: ``InvalidRequest`` (400) names the
parameter and the limit, ``NotFound`` (404) an unknown model, ``PayloadTooLarge`` (413) a body over
``max_request_bytes`` or an upload over ``max_upload_bytes``; backend errors pass through.

Media: ``image_url`` must be a base64 ``data:image/...`` URL (the gateway fetches nothing); the
encoded bytes go to ``VisionEncoder.Encode`` at the budget ``detail`` names; a ``video_url``
(``data:video/...``) goes to ``VisionEncoder.EncodeVideo``. ``input_audio`` is decoded here (``model.audio_io``,
16 kHz mono float32; over ``max_audio_s`` refused from the header) and sent as PCM to
``AudioFrontend.Encode``, which splits clips longer than the model's audio window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import numpy as np

from gemma_mesh.common.errors import InvalidRequest, MeshError, NotFound
from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.live.captions import RATE_HZ
from gemma_mesh.gateway.mesh_types import (
    ChatMessage,
    Delta,
    Done,
    Part,
    Sampling,
    TokenLogprobs,
    ToolCallDelta,
)
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.openai.media import decode_base64, image_bytes
from gemma_mesh.gateway.openai.protocol import (
    ChatCompletionAssistantMessage,
    ChatCompletionContentPartImage,
    ChatCompletionContentPartInputAudio,
    ChatCompletionContentPartVideo,
    ChatCompletionMessage,
    ChatCompletionMessageParam,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatCompletionSystemMessage,
    ChatCompletionTokenLogprob,
    ChatCompletionToolMessage,
    ChoiceLogprobs,
    CompletionTokensDetails,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)
from gemma_mesh.gateway.openai.protocol_base import ErrorInfo, ErrorResponse
from gemma_mesh.gateway.openai.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from gemma_mesh.gateway.settings import GatewaySettings
from gemma_mesh.model.audio_io import decode_audio

log = get_logger(__name__)
T = TypeVar("T")


def check_model(requested: str | None, served: str) -> None:
    """vLLM's ``_check_model``: None or the served name pass. Raises NotFound (404)."""
    if requested is not None and requested != served:
        raise NotFound(f"The model `{requested}` does not exist.", param="model")


def sse(payload: str) -> str:
    """One server-sent event: ``data: <payload>`` and a blank line."""
    return f"data: {payload}\n\n"


def error_event(error: MeshError) -> str:
    """The SSE ``data:`` event of an error that happens after the stream started (then ``[DONE]``)."""
    info = ErrorInfo(message=error.message, type=error.code, param=error.param, code=error.code)
    return sse(ErrorResponse(error=info).model_dump_json())


async def gather_or_cancel(*awaitables: Awaitable) -> list:
    """``asyncio.gather`` that cancels the other calls when one fails (no orphaned backend work)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def _naming(param: str, work: Awaitable[T]) -> T:
    """``work``, with an encoder's InvalidRequest re-raised naming the request field at fault."""
    try:
        return await work
    except InvalidRequest as error:
        raise InvalidRequest(f"{param}: {error.message}", param=param) from None


def _text_of(content: str | list | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content)


# The decoder's names of request parts -> the chat request's fields.
_DECODER_FIELDS = {
    "constraint.json_schema": "response_format.json_schema.schema",
    "constraint.json_object": "response_format",
    "tools_json": "tools",
}


def _request_field(error: InvalidRequest) -> InvalidRequest:
    """The decoder's InvalidRequest renamed after the chat request's field (``constraint.json_schema``
    -> ``response_format.json_schema.schema``); others unchanged."""
    field = _DECODER_FIELDS.get(error.param or "")
    if field is None:
        return error
    return InvalidRequest(field + error.message.removeprefix(error.param or ""), param=field)


_Stream = tuple[Delta | Done, AsyncIterator[Delta | Done]]  # a decoder call's first event and the rest


def _child_sampling(sampling: Sampling, index: int) -> Sampling:
    """Choice ``index``'s sampling: seed + index (vLLM's parallel sampling), or unseeded."""
    if sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**63)


def _total(dones: list[Done]) -> Done:
    """The usage of n choices of one prompt: the prompt once (choice 0's), completions summed."""
    first = dones[0]
    return dataclasses.replace(
        first,
        completion_tokens=sum(d.completion_tokens for d in dones),
        accepted_prediction_tokens=sum(d.accepted_prediction_tokens for d in dones),
        rejected_prediction_tokens=sum(d.rejected_prediction_tokens for d in dones),
    )


def _logprobs(entries: list[TokenLogprobs]) -> list[ChatCompletionTokenLogprob]:
    """The decoder's per-token log-probabilities in OpenAI's shape."""
    return [
        ChatCompletionTokenLogprob(
            token=e.token,
            logprob=e.logprob,
            bytes=list(e.token_bytes),
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, b, lp in e.top],
        )
        for e in entries
    ]


def _delta_tool_call(call: ToolCallDelta) -> DeltaToolCall:
    """OpenAI's streamed call fragment: id, type and name first, then the arguments."""
    if call.name:
        return DeltaToolCall(
            index=call.index,
            id=call.id,
            type="function",
            function=DeltaFunctionCall(name=call.name, arguments=""),
        )
    return DeltaToolCall(index=call.index, function=DeltaFunctionCall(arguments=call.arguments))


class OpenAIServingModels:
    """``/v1/models``: the one served model."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.name = settings.served_model_name

    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name, root=self.name)])

    def show_model(self, model_id: str) -> ModelCard:
        """Raises NotFound (404) for any other id."""
        check_model(model_id, self.name)
        return ModelCard(id=self.name, root=self.name)


class OpenAIServingChat:
    """``/v1/chat/completions`` (vLLM's ``OpenAIServingChat``).

    Limits (``GatewaySettings``): ``max_completion_tokens`` (largest ``max_tokens``; also the default),
    ``max_images_per_request``, ``max_audio_s`` (all ``input_audio`` of a request together), and the
    decoder's context length (its InvalidRequest passes through).
    """

    def __init__(self, clients: MeshClient, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.clients = clients
        self.settings = settings
        self.metrics = metrics

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """The answer, or (``stream``) an async generator of SSE lines ending with ``data: [DONE]``.

        Everything that can fail because of the request (model, limits, media, the decoder's prompt
        checks) fails before this returns, so a stream only starts once the first token is ready.

        Raises:
            NotFound: unknown model. InvalidRequest: limits, bad media, prompt over the context.
            Overloaded, BackendUnavailable: from the backends.
        """
        check_model(request.model, self.settings.served_model_name)
        request.check_tool_choice()
        limit = self.settings.max_completion_tokens
        max_tokens = request.requested_max_tokens or limit
        if max_tokens > limit:
            param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            raise InvalidRequest(
                f"{param}={max_tokens} is over this server's limit of {limit} (max_completion_tokens)",
                param=param,
            )
        messages = await self._mesh_messages(request.messages)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        sampling = request.to_sampling(max_tokens)
        # Choice 0 first: once its first token is out, its prompt's KV is in the prefix cache, and
        # the other n - 1 choices (started together) restore it instead of prefilling it again.
        streams = [
            await self._start(messages, sampling, f"{request_id}-0" if (request.n or 1) > 1 else request_id)
        ]
        try:
            streams += await gather_or_cancel(
                *(
                    self._start(messages, _child_sampling(sampling, i), f"{request_id}-{i}")
                    for i in range(1, request.n or 1)
                )
            )
        except BaseException:
            for _, events in streams:
                await events.aclose()
            raise
        if request.stream:
            return self._stream(request, request_id, streams)
        return await self._full(request, request_id, streams)

    async def _start(
        self, messages: list[ChatMessage], sampling: Sampling, request_id: str
    ) -> tuple[Delta | Done, AsyncIterator[Delta | Done]]:
        """One decoder call, up to its first event (so that its errors are the request's)."""
        events = self.clients.generate(messages, sampling, request_id=request_id)
        try:
            return await anext(events), events
        except InvalidRequest as error:
            await events.aclose()
            raise _request_field(error) from None
        except BaseException:
            await events.aclose()
            raise

    # --- request -> mesh messages -------------------------------------------------------
    async def _mesh_messages(self, messages: list[ChatCompletionMessageParam]) -> list[ChatMessage]:
        """OpenAI messages -> ``ChatMessage`` parts, media encoded concurrently, in order."""
        images: list[tuple[str, bytes, str]] = []
        audios: list[tuple[str, bytes]] = []
        videos: list[tuple[str, bytes]] = []
        for i, message in enumerate(messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, ChatCompletionContentPartImage):
                        param = f"messages.{i}.content.{j}.image_url.url"
                        images.append(
                            (param, image_bytes(part.image_url.url, param=param), part.image_url.detail)
                        )
                    elif isinstance(part, ChatCompletionContentPartVideo):
                        param = f"messages.{i}.content.{j}.video_url.url"
                        videos.append((param, image_bytes(part.video_url.url, param=param, kind="video")))
                    elif isinstance(part, ChatCompletionContentPartInputAudio):
                        param = f"messages.{i}.content.{j}.input_audio.data"
                        audios.append((param, decode_base64(part.input_audio.data, param=param)))
        if len(images) > self.settings.max_images_per_request:
            raise InvalidRequest(
                f"{len(images)} images in one request; the limit is {self.settings.max_images_per_request} "
                "(max_images_per_request)",
                param="messages",
            )
        if len(videos) > self.settings.max_videos_per_request:
            raise InvalidRequest(
                f"{len(videos)} videos in one request; the limit is {self.settings.max_videos_per_request} "
                "(max_videos_per_request)",
                param="messages",
            )
        budgets = await self._image_budgets([detail for _, _, detail in images])
        pcm = await gather_or_cancel(*(self._decode_audio(param, data) for param, data in audios))
        total_s = sum(a.shape[0] for a in pcm) / RATE_HZ
        if total_s > self.settings.max_audio_s:
            raise InvalidRequest(
                f"{total_s:.1f} s of input_audio in one request; the limit is "
                f"{self.settings.max_audio_s:.0f} s (max_audio_s)",
                param="messages",
            )
        encoded = await gather_or_cancel(
            *(
                _naming(param, self.clients.encode_image(data, max_soft_tokens=budget))
                for (param, data, _), budget in zip(images, budgets, strict=True)
            ),
            *(
                _naming(param, self.clients.encode_audio(pcm_f32=a, sample_rate_hz=RATE_HZ))
                for (param, _), a in zip(audios, pcm, strict=True)
            ),
            *(_naming(param, self.clients.encode_video(data)) for param, data in videos),
        )
        n_images, n_audios = len(images), len(audios)
        image_parts = [[Part(soft_tokens=e.soft_tokens)] for e in encoded[:n_images]]
        audio_parts = [
            [Part(soft_tokens=s.soft_tokens) for s in e[0]] for e in encoded[n_images : n_images + n_audios]
        ]
        video_parts = [[Part(soft_tokens=e)] for e in encoded[n_images + n_audios :]]
        out = []
        for i, message in enumerate(messages):
            out.append(self._mesh_message(i, message, image_parts, audio_parts, video_parts))
        return out

    async def _image_budgets(self, details: list[str]) -> list[int]:
        """``image_url.detail`` -> the vision soft-token budget: ``low`` the encoder's smallest,
        ``high`` its largest (``Describe``), ``auto`` 0 (its default for images)."""
        if all(detail == "auto" for detail in details):
            return [0] * len(details)
        budgets = await self.clients.vision_budgets()
        pick = {"auto": 0, "low": min(budgets), "high": max(budgets)}
        return [pick[detail] for detail in details]

    async def _decode_audio(self, param: str, data: bytes) -> np.ndarray:
        try:
            return await asyncio.to_thread(
                decode_audio, data, RATE_HZ, max_duration_s=self.settings.max_audio_s
            )
        except InvalidRequest as error:
            raise InvalidRequest(f"{param}: {error.message}", param=param) from None

    @staticmethod
    def _mesh_message(
        i: int,
        message: ChatCompletionMessageParam,
        images: list[list[Part]],
        audios: list[list[Part]],
        videos: list[list[Part]],
    ) -> ChatMessage:
        if isinstance(message, ChatCompletionToolMessage):
            return ChatMessage(
                "tool", [Part(text=_text_of(message.content))], tool_call_id=message.tool_call_id
            )
        if isinstance(message, ChatCompletionSystemMessage):
            return ChatMessage("system", [Part(text=_text_of(message.content))])
        if isinstance(message, ChatCompletionAssistantMessage):
            calls = json.dumps(message.tool_calls) if message.tool_calls else ""
            return ChatMessage("assistant", [Part(text=_text_of(message.content))], tool_calls_json=calls)
        if isinstance(message.content, str):
            return ChatMessage("user", [Part(text=message.content)])
        parts: list[Part] = []
        for part in message.content:
            if isinstance(part, ChatCompletionContentPartImage):
                parts.extend(images.pop(0))
            elif isinstance(part, ChatCompletionContentPartInputAudio):
                parts.extend(audios.pop(0))
            elif isinstance(part, ChatCompletionContentPartVideo):
                parts.extend(videos.pop(0))
            else:
                parts.append(Part(text=part.text))
        return ChatMessage("user", parts)

    # --- responses ----------------------------------------------------------------------
    @staticmethod
    async def _events(
        first: Delta | Done, events: AsyncIterator[Delta | Done]
    ) -> AsyncIterator[Delta | Done]:
        yield first
        async for event in events:
            yield event

    async def _merged(self, streams: list[_Stream]) -> AsyncIterator[tuple[int, Delta | Done]]:
        """The choices' events as they come, tagged with the choice index (one pump task per choice
        when n > 1). Raises the first choice's error."""
        if len(streams) == 1:
            async for event in self._events(*streams[0]):
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: _Stream) -> None:
            try:
                async for event in self._events(*stream):
                    queue.put_nowait((index, event))
                queue.put_nowait((index, None))
            except Exception as error:  # handed to the consumer, which raises it
                queue.put_nowait((index, error))

        tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
        try:
            running = len(tasks)
            while running:
                index, event = await queue.get()
                if event is None:
                    running -= 1
                elif isinstance(event, Exception):
                    raise event
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()

    def _usage(self, done: Done, reasoning_tokens: int, request: ChatCompletionRequest) -> UsageInfo:
        """Usage; ``completion_tokens_details`` when thinking was on or a prediction was given."""
        self.metrics.tokens_generated.inc(done.completion_tokens)
        details = None
        if request.enable_thinking or request.prediction is not None:
            details = CompletionTokensDetails(
                reasoning_tokens=reasoning_tokens,
                accepted_prediction_tokens=done.accepted_prediction_tokens,
                rejected_prediction_tokens=done.rejected_prediction_tokens,
            )
        return UsageInfo(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_prompt_tokens),
            completion_tokens_details=details,
        )

    async def _full(
        self, request: ChatCompletionRequest, request_id: str, streams: list[_Stream]
    ) -> ChatCompletionResponse:
        try:
            collected = await gather_or_cancel(
                *(self._collect(request, i, stream) for i, stream in enumerate(streams))
            )
        finally:
            for _, events in streams:
                await events.aclose()
        dones = [done for _, done, _ in collected]
        return ChatCompletionResponse(
            id=request_id,
            model=self.settings.served_model_name,
            choices=[choice for choice, _, _ in collected],
            usage=self._usage(_total(dones), sum(r for _, _, r in collected), request),
        )

    async def _collect(
        self, request: ChatCompletionRequest, index: int, stream: _Stream
    ) -> tuple[ChatCompletionResponseChoice, Done, int]:
        """One choice's answer, its ``Done`` and its reasoning tokens."""
        thinking = request.enable_thinking
        answer: list[str] = []
        reasoning: list[str] = []
        reasoning_tokens = 0
        calls: dict[int, ToolCall] = {}
        logprobs: list[ChatCompletionTokenLogprob] = []
        done: Done | None = None
        async for event in self._events(*stream):
            if isinstance(event, Done):
                done = event
            elif event.channel == "reasoning":
                reasoning.append(event.text)
                reasoning_tokens += len(event.token_ids)
            else:
                answer.append(event.text)
                logprobs += _logprobs(event.logprobs)
                for delta in event.tool_calls:
                    if delta.name:
                        calls[delta.index] = ToolCall(
                            id=delta.id, function=FunctionCall(name=delta.name, arguments="")
                        )
                    calls[delta.index].function.arguments += delta.arguments
        assert done is not None, "decoder stream ended without a Finished message"
        content = "".join(answer)
        message = ChatCompletionMessage(
            # With tool calls and no text, content is null (as OpenAI answers).
            content=content if content or not calls else None,
            reasoning_content="".join(reasoning) if thinking else None,
            tool_calls=[calls[i] for i in sorted(calls)],
        )
        choice = ChatCompletionResponseChoice(
            index=index,
            message=message,
            finish_reason=done.finish_reason,
            logprobs=ChoiceLogprobs(content=logprobs) if request.logprobs else None,
        )
        return choice, done, reasoning_tokens

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, streams: list[_Stream]
    ) -> AsyncIterator[str]:
        """SSE lines as OpenAI sends them: per choice a role chunk, content/reasoning/tool-call
        deltas and a chunk with its finish reason (choices interleaved, each chunk naming its
        index), then the usage chunk (``include_usage``), ``[DONE]``. A failure midway is sent as
        an error event, then ``[DONE]``. Closing this generator cancels the decoder calls."""
        created = int(time.time())
        thinking = request.enable_thinking

        def chunk(
            index: int,
            delta: DeltaMessage,
            finish_reason: str | None = None,
            logprobs: list[TokenLogprobs] | None = None,
        ) -> str:
            choice = ChatCompletionResponseStreamChoice(
                index=index,
                delta=delta,
                finish_reason=finish_reason,
                logprobs=ChoiceLogprobs(content=_logprobs(logprobs)) if logprobs else None,
            )
            return sse(
                ChatCompletionStreamResponse(
                    id=request_id, created=created, model=self.settings.served_model_name, choices=[choice]
                ).model_dump_json()
            )

        try:
            try:
                for i in range(len(streams)):
                    yield chunk(i, DeltaMessage(role="assistant", content=""))
                reasoning_tokens = 0
                dones: list[Done] = []
                async for i, event in self._merged(streams):
                    if isinstance(event, Done):
                        yield chunk(i, DeltaMessage(), event.finish_reason)
                        dones.append(event)
                    elif event.channel == "reasoning":
                        reasoning_tokens += len(event.token_ids)
                        if thinking and event.text:
                            yield chunk(i, DeltaMessage(reasoning_content=event.text))
                    else:
                        if event.text or event.logprobs:
                            yield chunk(i, DeltaMessage(content=event.text), logprobs=event.logprobs)
                        for call in event.tool_calls:
                            yield chunk(i, DeltaMessage(tool_calls=[_delta_tool_call(call)]))
                usage = self._usage(_total(dones), reasoning_tokens, request)
                if request.include_usage:
                    final = ChatCompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.settings.served_model_name,
                        choices=[],
                        usage=usage,
                    )
                    yield sse(final.model_dump_json())
            except MeshError as error:
                self.metrics.errors.labels(error.code).inc()
                yield error_event(error)
            except Exception as error:  # reported to the client, logged here
                log.exception("chat stream failed", request_id=request_id)
                yield error_event(MeshError(f"internal error: {type(error).__name__}"))
            yield sse("[DONE]")
        finally:
            for _, events in streams:
                await events.aclose()
