"""The OpenAI-compatible API (``gateway/openai``) through the official ``openai`` client and raw httpx.

A real gateway in front of the real mesh on the tiny random-weight bundle: the text is random, so
the tests check structure, determinism (greedy twice gives the same), usage counts and equality
between paths (stream vs not, WAV vs FLAC, formats), never words.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import re
import subprocess
import time
from pathlib import Path
from unittest.mock import MagicMock

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from PIL import Image
from skimage import data as skdata

from gemma_mesh.common.errors import Overloaded
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.mesh_types import Delta
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.openai.protocol import ChatCompletionRequest
from gemma_mesh.gateway.openai.serving import OpenAIServingChat
from gemma_mesh.gateway.settings import GatewaySettings
from tests.gateway.mesh import GatewayThread

MODEL = GatewaySettings().served_model_name
HELLO = [{"role": "user", "content": "Say hello."}]
SRT_CUE = re.compile(r"^(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)$")
VTT_CUE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)$")


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def limited_url(backends):
    """A gateway with small limits: 64 KiB uploads and bodies, 1 image, 10 s audio, 1 request per key."""
    settings = backends.gateway_settings(
        max_upload_bytes=64 * 1024,
        max_request_bytes=64 * 1024,
        max_images_per_request=1,
        max_audio_s=10.0,
        max_requests_per_key=1,
        max_completion_tokens=4000,
    )
    with GatewayThread(settings) as url:
        yield url


@pytest.fixture(scope="module")
def encoded(librivox_clips: list[Path], tmp_path_factory) -> dict[str, bytes]:
    """The first LibriVox clip as WAV and, through ffmpeg, FLAC, MP3, OGG/Vorbis and WebM/Opus."""
    out = tmp_path_factory.mktemp("encoded")
    codecs = {"flac": ["-c:a", "flac"], "mp3": ["-c:a", "libmp3lame"], "ogg": ["-c:a", "libvorbis"]}
    codecs["webm"] = ["-c:a", "libopus"]
    files = {"wav": librivox_clips[0].read_bytes()}
    for ext, args in codecs.items():
        path = out / f"clip.{ext}"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-i", str(librivox_clips[0]), *args, str(path)], check=True
        )
        files[ext] = path.read_bytes()
    return files


def wav_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def data_url(array: np.ndarray, fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat(client: openai.OpenAI, messages=HELLO, **kwargs):
    """Greedy, 12 tokens unless ``kwargs`` say otherwise."""
    return client.chat.completions.create(
        model=MODEL, messages=messages, **{"temperature": 0, "max_tokens": 12, **kwargs}
    )


def assert_still_serving(client: openai.OpenAI) -> None:
    assert chat(client, max_tokens=2).choices[0].message.content is not None


# --- models and text chat ---------------------------------------------------------------------


def test_models_list_and_unknown_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert_still_serving(client)


def test_chat_greedy_is_deterministic_with_consistent_usage(client: openai.OpenAI, gateway_url: str) -> None:
    first, second = chat(client), chat(client, extra_body={"future_field": {"x": 1}})  # unknown: ignored
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")
    usage = first.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= 12 and usage.prompt_tokens > 0
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    if first.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 12
    else:
        assert first.choices[0].finish_reason == "stop"
    # Thinking off: no reasoning_content key at all.
    raw = httpx.post(
        f"{gateway_url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}, timeout=60
    )
    assert raw.status_code == 200 and "reasoning_content" not in raw.json()["choices"][0]["message"]


def test_stream_equals_non_stream_and_ends_with_usage(client: openai.OpenAI, gateway_url: str) -> None:
    full = chat(client, max_tokens=24)
    chunks = list(chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens,
        full.usage.completion_tokens,
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    # Raw SSE framing: data lines separated by blank lines, [DONE] last, no usage chunk unless asked.
    body = {"messages": HELLO, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def _greedy_ids(decoder_target: str, prompt: str, max_tokens: int) -> list[int]:
    """The decoder's greedy token ids for one user message (what the API's answer is made of)."""
    import grpc

    from gemma_mesh.proto.v1 import decoder_pb2, decoder_pb2_grpc

    message = decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(text=prompt)])
    request = decoder_pb2.GenerateRequest(messages=[message], max_tokens=max_tokens)
    with grpc.insecure_channel(decoder_target) as channel:
        replies = decoder_pb2_grpc.DecoderStub(channel).Generate(request, timeout=120)
        return [t for r in replies if r.HasField("delta") for t in r.delta.token_ids]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_predicted_output_gives_the_same_answer_and_counts_its_tokens(
    client: openai.OpenAI, tiny_bundle, backends
) -> None:
    """OpenAI's ``prediction``: the answer never changes; usage says how many predicted tokens the
    decoder accepted (each a decode step saved) and rejected. A predicted text is tokenized, so it
    is accepted up to the first token its text does not tokenize back to (the random tiny model
    emits byte-fallback tokens whose text is U+FFFD): the expected counts come from the decoder's
    own token ids, for the prompt whose answer round-trips furthest."""
    tokenizer = tiny_bundle.tokenizer
    prompts = ["Say hello.", "Tell me a story.", "Count to ten."]
    answers = {p: _greedy_ids(backends.decoder, p, 24) for p in prompts}
    texts = {p: tokenizer.decode(ids, skip_special_tokens=True) for p, ids in answers.items()}
    retokenized = {p: tokenizer.encode(texts[p], add_special_tokens=False).ids for p in prompts}
    prompt = max(prompts, key=lambda p: _common_prefix(retokenized[p], answers[p]))
    messages = [{"role": "user", "content": prompt}]
    plain = chat(client, messages, max_tokens=24)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # no thinking, no prediction: no details
    right = chat(client, messages, max_tokens=24, prediction={"type": "content", "content": text})
    assert right.choices[0].message.content == text
    details = right.usage.completion_tokens_details
    used = min(len(tokenizer.encode(text, add_special_tokens=False).ids), 24 - 1)  # capped at max_tokens - 1
    accepted = min(
        _common_prefix(tokenizer.encode(text, add_special_tokens=False).ids, answers[prompt]), used
    )
    assert accepted >= 1
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (
        accepted,
        used - accepted,
    )
    wrong = [{"type": "text", "text": "zebra quantum "}, {"type": "text", "text": "marmalade"}]
    predicted = tokenizer.encode("zebra quantum marmalade", add_special_tokens=False).ids
    chunks = list(
        chat(
            client,
            messages,
            max_tokens=24,
            prediction={"type": "content", "content": wrong},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    details = chunks[-1].usage.completion_tokens_details
    accepted = _common_prefix(predicted, answers[prompt])
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (
        accepted,
        len(predicted) - accepted,
    )
    assert details.rejected_prediction_tokens >= 1


def test_thinking_switch_gives_reasoning_content(client: openai.OpenAI, gateway_url: str) -> None:
    url = f"{gateway_url}/v1/chat/completions"
    for extra in ({"chat_template_kwargs": {"enable_thinking": True}}, {"reasoning_effort": "high"}):
        reply = httpx.post(url, json={"messages": HELLO, "max_tokens": 4, **extra}, timeout=60)
        assert reply.status_code == 200
        assert isinstance(reply.json()["choices"][0]["message"]["reasoning_content"], str)
        assert "reasoning_tokens" in reply.json()["usage"]["completion_tokens_details"]
    off = httpx.post(url, json={"messages": HELLO, "max_tokens": 4, "reasoning_effort": "none"}, timeout=60)
    assert "reasoning_content" not in off.json()["choices"][0]["message"]
    with pytest.raises(openai.BadRequestError):
        chat(client, reasoning_effort="high", extra_body={"chat_template_kwargs": {"enable_thinking": False}})


# --- media in chat ----------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "fmt"), [(skdata.astronaut, "JPEG"), (skdata.coffee, "PNG")])
def test_image_adds_its_soft_tokens_to_the_prompt(
    client: openai.OpenAI, tiny_bundle, image, fmt: str
) -> None:
    array = image()
    with_image = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(array, fmt)}},
                {"type": "text", "text": "Say hello."},
            ],
        }
    ]
    plain, pictured = chat(client), chat(client, messages=with_image)
    budget = tiny_bundle.manifest.vision.default_max_soft_tokens
    soft_tokens = tiny_bundle.image_processor.num_soft_tokens(array.shape[0], array.shape[1], budget)
    # The image becomes boi + soft tokens + eoi (the manifest's delimiters) in the prompt.
    assert pictured.usage.prompt_tokens - plain.usage.prompt_tokens == soft_tokens + 2
    assert chat(client, messages=with_image).choices[0].message.content == pictured.choices[0].message.content


def test_input_audio_adds_its_soft_tokens(client: openai.OpenAI, tiny_bundle, encoded) -> None:
    samples, rate = sf.read(io.BytesIO(encoded["wav"]), dtype="float32")
    expected = tiny_bundle.log_mel.num_soft_tokens(samples.shape[0]) + 2  # boa + audio tokens + eoa
    plain = chat(client)
    for fmt in ("wav", "mp3"):
        part = {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(encoded[fmt]).decode(), "format": fmt},
        }
        reply = chat(
            client, messages=[{"role": "user", "content": [part, {"type": "text", "text": "Say hello."}]}]
        )
        delta = reply.usage.prompt_tokens - plain.usage.prompt_tokens
        if fmt == "wav":
            assert rate == 16000 and delta == expected
        else:  # MP3 encoder delay and padding shift the length by a frame or two
            assert abs(delta - expected) <= 2


# --- transcriptions and translations ----------------------------------------------------------


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_transcription_in_every_response_format(
    client: openai.OpenAI, librivox_clips: list[Path], tiny_bundle
) -> None:
    clip = librivox_clips[0]
    duration = sf.info(clip).duration

    def transcribe(fmt: str):
        with clip.open("rb") as f:
            return client.audio.transcriptions.create(model=MODEL, file=f, response_format=fmt)

    text = transcribe("json").text
    assert isinstance(text, str) and text
    assert transcribe("text").strip() == text
    verbose = transcribe("verbose_json")
    assert verbose.text == text and abs(verbose.duration - duration) < 0.01 and verbose.task == "transcribe"
    assert verbose.segments and " ".join(s.text for s in verbose.segments) == text
    vocab = tiny_bundle.manifest.text.vocab_size
    for s in verbose.segments:
        assert 0 <= s.start < s.end <= duration + 1e-3
        # Greedy picks the most likely token, whose probability is at least 1 / vocab.
        assert -math.log(vocab) <= s.avg_logprob < 0
    srt = transcribe("srt").strip().split("\n\n")
    for n, cue in enumerate(srt, start=1):
        match = SRT_CUE.match(cue)
        assert match and int(match[1]) == n, cue
        assert 0 <= _seconds(*match.groups()[1:5]) < _seconds(*match.groups()[5:9]) <= duration + 1e-3
    assert " ".join(SRT_CUE.match(c)[10] for c in srt) == text
    vtt = transcribe("vtt")
    assert vtt.startswith("WEBVTT\n\n")
    cues = vtt[len("WEBVTT\n\n") :].strip().split("\n\n")
    assert all(VTT_CUE.match(c) for c in cues) and " ".join(VTT_CUE.match(c)[9] for c in cues) == text


def test_silence_and_noise_transcribe_to_nothing(client: openai.OpenAI, tmp_path: Path) -> None:
    """As in live captions, the VAD decides: no speech, no text (no hallucinated caption)."""
    rng = np.random.default_rng(1)
    for name, audio in {
        "silence": np.zeros(3 * 16000, np.float32),
        "noise": (rng.standard_normal(3 * 16000) * 0.05).astype(np.float32),
    }.items():
        path = tmp_path / f"{name}.wav"
        sf.write(path, audio, 16000)
        with path.open("rb") as f:
            verbose = client.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json")
        assert verbose.text == "" and not verbose.segments, name


def test_every_container_is_accepted_and_lossless_ones_agree(client: openai.OpenAI, encoded) -> None:
    texts = {}
    for ext, data in encoded.items():
        reply = client.audio.transcriptions.create(model=MODEL, file=(f"clip.{ext}", data))
        assert isinstance(reply.text, str) and reply.text, ext
        texts[ext] = reply.text
    assert texts["wav"] == texts["flac"]


def test_long_file_is_segmented_without_truncation(client: openai.OpenAI, librivox_clips: list[Path]) -> None:
    silence = np.zeros(16000, np.float32)
    pieces, spans, position = [], [], 0
    for clip in librivox_clips * 2:  # about 50 s of speech with 1 s pauses, speech to the very end
        audio, _ = sf.read(clip, dtype="float32")
        if pieces:
            pieces.append(silence)
            position += silence.size
        pieces.append(audio)
        spans.append((position / 16000, (position + audio.size) / 16000))
        position += audio.size
    audio = np.concatenate(pieces)
    duration = audio.size / 16000
    reply = client.audio.transcriptions.create(
        model=MODEL, file=("long.wav", wav_bytes(audio)), response_format="verbose_json"
    )
    segments = reply.segments
    assert duration > 30 and len(segments) >= 2
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))
    assert all(0 <= s.start < s.end <= duration + 1e-3 and s.end - s.start <= 30.0 for s in segments)
    for start, end in spans:  # every clip overlaps a segment
        assert any(s.start < end and s.end > start for s in segments), (start, end)
    covered = sum(
        min(e, s.end) - max(b, s.start) for b, e in spans for s in segments if s.start < e and s.end > b
    )
    assert covered >= 0.8 * sum(e - b for b, e in spans)
    assert segments[-1].end >= duration - 0.5  # the last words are not cut off
    assert reply.text == " ".join(s.text for s in segments)


def test_translation_and_language_hint(client: openai.OpenAI, encoded) -> None:
    translated = client.audio.translations.create(
        model=MODEL, file=("clip.wav", encoded["wav"]), response_format="verbose_json"
    )
    assert translated.language == "english" and translated.text and translated.segments
    again = client.audio.translations.create(model=MODEL, file=("clip.wav", encoded["wav"]))
    assert again.text == translated.text
    hinted = client.audio.transcriptions.create(
        model=MODEL, file=("clip.wav", encoded["wav"]), language="en", response_format="verbose_json"
    )
    assert hinted.language == "english"
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model=MODEL, file=("clip.wav", encoded["wav"]), language="xx-!!")
    assert info.value.body["param"] == "language"
    assert_still_serving(client)


# --- errors -------------------------------------------------------------------------------------


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def _audio_message(data: str, fmt: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}
    ]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {"messages": _image_message("data:image/jpeg;base64," + base64.b64encode(b"no jpeg").decode())},
            "messages.0.content.0.image_url.url",
        ),
        ({"messages": _image_message("data:image/png;base64,@@@")}, "messages.0.content.0.image_url.url"),
        ({"messages": _image_message("https://example.com/cat.jpg")}, "messages.0.content.0.image_url.url"),
        ({"messages": _audio_message("AAAA", "aiff")}, "messages.0.content.0.input_audio.format"),
        ({"messages": _audio_message("AAAA", "wav")}, "messages.0.content.0.input_audio.data"),
        ({"messages": [{"role": "user", "content": [{"type": "video_url"}]}]}, "messages.0.content.0"),
        ({"n": 0}, "n"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
        ({"temperature": "hot"}, "temperature"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"prediction": {"type": "file", "content": "x"}}, "prediction.type"),
        ({"max_tokens": "5"}, "max_tokens"),  # no coercion: a string or a bool is not a count
        ({"max_tokens": True}, "max_tokens"),
        ({"extra_body": {"stream": "yes"}}, "stream"),
        ({"extra_body": {"top_k": 10**12}}, "top_k"),  # past the decoder's int32
        ({"top_p": True}, "top_p"),
        ({"temperature": "0.5"}, "temperature"),
        (
            {"prediction": {"type": "content", "content": [{"type": "image_url"}]}},
            "prediction.content.0.type",
        ),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": MODEL, "messages": HELLO, **kwargs})
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert info.value.body["message"].startswith(param) and info.value.body["type"] == "invalid_request_error"
    assert_still_serving(client)


def test_bad_transcription_requests(client: openai.OpenAI, encoded) -> None:
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=MODEL, file=("notes.txt", b"this is not audio at all"))
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(
            model=MODEL, file=("clip.wav", encoded["wav"]), response_format="docx"
        )
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", encoded["wav"]))
    assert_still_serving(client)


def test_api_keys(secured_gateway_url: str) -> None:
    base = secured_gateway_url + "/v1"
    missing = httpx.post(f"{base}/chat/completions", json={"messages": HELLO}, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    for key in ("wrong-key", "test-key-1x"):
        bad = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            bad.audio.transcriptions.create(model=MODEL, file=("a.wav", b"RIFF"))
    good = openai.OpenAI(base_url=base, api_key="test-key-2", max_retries=0)
    assert [m.id for m in good.models.list().data] == [MODEL]
    assert_still_serving(good)


def test_limits_of_a_small_gateway(limited_url: str, encoded, librivox_clips: list[Path]) -> None:
    client = openai.OpenAI(base_url=limited_url + "/v1", api_key="x", max_retries=0)
    too_big = b"RIFF" + bytes(100 * 1024)
    reply = httpx.post(
        f"{limited_url}/v1/audio/transcriptions", files={"file": ("a.wav", too_big)}, data={"model": MODEL}
    )
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "max_upload_bytes" in error["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 70_000}])
    assert info.value.status_code == 413 and "max_request_bytes" in info.value.message
    small = data_url(skdata.astronaut()[::8, ::8].copy(), "PNG")
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small}}] * 2}]
    with pytest.raises(openai.BadRequestError, match="max_images_per_request"):
        client.chat.completions.create(model=MODEL, messages=two)
    long_audio = np.concatenate([sf.read(c, dtype="float32")[0] for c in librivox_clips[:2]])[: 12 * 16000]
    compact = io.BytesIO()
    sf.write(compact, long_audio, 16000, format="OGG", subtype="VORBIS")
    with pytest.raises(openai.BadRequestError, match="limit of 10 s"):
        client.audio.transcriptions.create(model=MODEL, file=("long.ogg", compact.getvalue()))
    assert_still_serving(client)


def _wait_until_free(url: str, timeout_s: float = 5.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}, timeout=60
        )
        if reply.status_code == 200 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_disconnect_cancels_the_stream_and_frees_the_slot(limited_url: str) -> None:
    """One request per key: a 4000-token stream (about 13 s here) that the client drops must stop and
    free the key's slot at once."""
    body = {"messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{limited_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept referenced: dropping the iterator closes the connection
        next(lines)
        busy = httpx.post(
            f"{limited_url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}, timeout=60
        )
        assert busy.status_code == 429 and "max_requests_per_key" in busy.json()["error"]["message"]
    assert _wait_until_free(limited_url).status_code == 200


def _closed_requests(url: str, route: str = "/v1/chat/completions", status: str = "499") -> float:
    """How many requests to ``route`` the gateway answered ``status`` (499: client closed request)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(
        rf'^gemma_mesh_gateway_http_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$',
        text,
        re.M,
    )
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("route", "content_type"),
    [
        ("/v1/chat/completions", "application/json"),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=b"),
    ],
)
def test_a_client_gone_while_sending_its_body_is_a_499(
    gateway_url: str, route: str, content_type: str
) -> None:
    """Half a body, then the connection closes: a 499, not an unhandled error (500)."""
    import socket
    from urllib.parse import urlsplit

    before = (_closed_requests(gateway_url, route), _closed_requests(gateway_url, route, "500"))
    host = urlsplit(gateway_url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
        head = (
            f"POST {route} HTTP/1.1\r\nHost: {host.netloc}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"--b\r\n" + b"x" * 1000)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while _closed_requests(gateway_url, route) == before[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _closed_requests(gateway_url, route) == before[0] + 1
    assert _closed_requests(gateway_url, route, "500") == before[1]


def test_disconnect_cancels_a_non_streamed_request(limited_url: str) -> None:
    """The generation is cancelled and the request ends as a 499 (not an unhandled error)."""
    before = _closed_requests(limited_url)
    body = {"messages": HELLO, "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{limited_url}/v1/chat/completions", json=body, timeout=1.0)
    assert _wait_until_free(limited_url).status_code == 200
    assert _closed_requests(limited_url) == before + 1


# --- serving without a mesh (mock backend) ---------------------------------------------------


async def _one_delta_then_overloaded(messages, sampling, *, request_id=None):
    yield Delta("Hel", [1, 2], "answer")
    raise Overloaded("decoder queue is full")


def test_error_mid_stream_is_an_sse_error_event_then_done() -> None:
    mesh = MagicMock(spec=MeshClient)
    mesh.generate = _one_delta_then_overloaded  # a decoder overloaded mid-answer
    serving = OpenAIServingChat(mesh, GatewaySettings(), GatewayMetrics())
    request = ChatCompletionRequest.model_validate({"messages": HELLO, "stream": True})

    async def run() -> list[str]:
        stream = await serving.create_chat_completion(request)
        return [line async for line in stream]

    lines = asyncio.run(run())
    assert lines[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert payloads[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert payloads[-1] == {
        "error": {
            "message": "decoder queue is full",
            "type": "overloaded_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
