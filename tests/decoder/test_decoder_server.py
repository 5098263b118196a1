"""The decoder through a real gRPC server on a loopback port.

Greedy parity with transformers (text and multimodal), concurrent requests equal to their solo
runs, prefix cache on vs off, sliding-window boundaries, cancellation, bad input, health, metrics.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from skimage import data as skdata

from gemma_mesh.common.grpc_server import error_detail, message_options
from gemma_mesh.common.tensors import to_tensor_pb
from gemma_mesh.decoder.server import start_decoder
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.proto.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from tests.conftest import reference_generate
from tests.grpc_helpers import ServerThread

MiB = 1024 * 1024


def _settings(**overrides) -> DecoderSettings:
    base = {
        "port": 0,
        "metrics_port": 0,
        "providers": ["CPUExecutionProvider"],
        "max_batch_size": 8,
        "max_queue_size": 32,
    }
    return DecoderSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def decoder(tiny_bundle):
    with ServerThread(lambda: start_decoder(_settings(prefill_chunk_tokens=24), tiny_bundle)) as started:
        yield started


@pytest.fixture(scope="module")
def stub(decoder):
    channel = grpc.insecure_channel(f"127.0.0.1:{decoder.port}", options=message_options(64 * MiB))
    yield decoder_pb2_grpc.DecoderStub(channel)
    channel.close()


def _text(role: str, text: str) -> decoder_pb2.Message:
    return decoder_pb2.Message(role=role, content=[decoder_pb2.ContentPart(text=text)])


def _request(messages, max_tokens=16, **kwargs) -> decoder_pb2.GenerateRequest:
    return decoder_pb2.GenerateRequest(messages=messages, max_tokens=max_tokens, **kwargs)


def _collect(stub, request, timeout=120):
    ids, text, reasoning, finished = [], [], [], None
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("delta"):
            ids.extend(response.delta.token_ids)
            (reasoning if response.delta.channel == decoder_pb2.REASONING else text).append(
                response.delta.text
            )
        else:
            finished = response.finished
    assert finished is not None
    return ids, "".join(text), "".join(reasoning), finished


def _prompt_ids(bundle, messages_dicts, **kw):
    return bundle.prompt_builder.build(messages_dicts, **kw).input_ids


def test_health_and_reflection(decoder):
    channel = grpc.insecure_channel(f"127.0.0.1:{decoder.port}")
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="gemma_mesh.v1.Decoder")
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_greedy_text_parity_with_transformers(stub, tiny_bundle, torch_reference):
    request = _request(
        [_text("system", "You are terse."), _text("user", "Name three rivers.")], max_tokens=20
    )
    ids, _, _, finished = _collect(stub, request)
    expected = reference_generate(
        torch_reference,
        _prompt_ids(
            tiny_bundle,
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three rivers."},
            ],
        ),
        20,
    )
    assert ids == expected
    assert finished.usage.completion_tokens == len(ids)
    assert finished.reason == (decoder_pb2.LENGTH if len(ids) == 20 else decoder_pb2.STOP)
    assert finished.timings.ttft_ms > 0 and finished.usage.prompt_tokens > 10


def test_predicted_outputs_keep_transformers_greedy_output_and_report_usage(
    stub, tiny_bundle, torch_reference
):
    """A prediction that is right for 6 tokens (as ids), then one given as text: the answer is
    transformers' greedy ``generate()`` either way; usage says how much of each was accepted."""
    messages = [_text("user", "Describe the sea in winter.")]
    expected = reference_generate(
        torch_reference,
        _prompt_ids(tiny_bundle, [{"role": "user", "content": "Describe the sea in winter."}]),
        18,
    )
    wrong = [*expected[:6], (expected[6] + 1) % tiny_bundle.manifest.text.vocab_size, *expected[7:]]
    ids, _, _, finished = _collect(
        stub, _request(messages, max_tokens=18, prediction=decoder_pb2.Prediction(token_ids=wrong))
    )
    assert ids == expected
    assert finished.usage.accepted_prediction_tokens == 6
    assert finished.usage.rejected_prediction_tokens == 17 - 6
    text = tiny_bundle.tokenizer.decode(expected, skip_special_tokens=False)
    ids, _, _, finished = _collect(
        stub, _request(messages, max_tokens=18, prediction=decoder_pb2.Prediction(text=text))
    )
    assert ids == expected
    retokenized = tiny_bundle.tokenizer.encode(text, add_special_tokens=False).ids
    same = next((i for i, (a, b) in enumerate(zip(retokenized, expected, strict=False)) if a != b), 17)
    assert finished.usage.accepted_prediction_tokens == min(same, len(retokenized), 17)


def test_greedy_multimodal_parity_with_transformers(stub, tiny_bundle, torch_reference, librivox_clips):
    import torch

    photo = skdata.coffee()
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    pre = tiny_bundle.image_processor.preprocess(tiny_bundle.image_processor.decode_image(buf.getvalue()))
    (image_tokens,) = tiny_bundle.encode_images([pre])
    wav, _ = sf.read(librivox_clips[3], dtype="float32")
    wav = wav[: 2 * 16_000]
    audio_tokens = tiny_bundle.encode_audio(wav)
    content = [
        decoder_pb2.ContentPart(
            soft_tokens=decoder_pb2.SoftTokens(modality=common_pb2.IMAGE, tokens=to_tensor_pb(image_tokens))
        ),
        decoder_pb2.ContentPart(
            soft_tokens=decoder_pb2.SoftTokens(modality=common_pb2.AUDIO, tokens=to_tensor_pb(audio_tokens))
        ),
        decoder_pb2.ContentPart(text="What is in the cup, and what is said?"),
    ]
    ids, _, _, _ = _collect(
        stub, _request([decoder_pb2.Message(role="user", content=content)], max_tokens=16)
    )

    model, processor = torch_reference
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.fromarray(photo)},
                {"type": "audio", "audio": wav},
                {"type": "text", "text": "What is in the cup, and what is said?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(model.generation_config.eos_token_id)
    cut = next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))
    assert ids == expected[:cut]


def test_concurrent_requests_equal_their_solo_runs(stub):
    prompts = [f"Story number {i}: a {w} walks into a {p}." for i, (w, p) in enumerate(
        [("cat", "bar"), ("dog", "park"), ("robot", "lab"), ("horse", "barn"),
         ("fish", "pond"), ("bird", "tree"), ("child", "school"), ("ghost", "house")]
    )]  # fmt: skip
    requests = [_request([_text("user", p)], max_tokens=12 + i) for i, p in enumerate(prompts)]
    solo = [_collect(stub, r)[0] for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda r: _collect(stub, r)[0], requests))
    assert together == solo
    assert len({tuple(s) for s in solo}) > 1  # different prompts, different outputs


def test_prefix_cache_on_and_off_give_the_same_output(tiny_bundle):
    system = "You are a careful assistant who answers in full sentences. " * 4
    turns = ["What is the capital of France?", "And of Italy?", "And of Spain?"]
    results = {}
    for label, cache_bytes in (("on", 64 * MiB), ("off", 0)):
        with ServerThread(
            lambda cb=cache_bytes: start_decoder(_settings(prefix_cache_bytes=cb), tiny_bundle)
        ) as srv:
            channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
            s = decoder_pb2_grpc.DecoderStub(channel)
            runs = [
                _collect(s, _request([_text("system", system), _text("user", t)], max_tokens=10))
                for t in turns
            ]
            results[label] = runs
            hit_ratio = srv.engine.prefix_cache.stats.hit_ratio
            channel.close()
        if label == "on":
            assert hit_ratio > 0
    assert [r[0] for r in results["on"]] == [r[0] for r in results["off"]]
    assert [r[3].usage.cached_prompt_tokens for r in results["off"]] == [0, 0, 0]
    assert all(r[3].usage.cached_prompt_tokens >= 16 for r in results["on"][1:])


def test_growing_audio_reuses_the_previous_prompts_kv(tiny_bundle, librivox_clips):
    """Live captions decode a growing segment: a prompt whose audio extends the previous one's
    reuses its KV up to the previous audio's end (per-token media keys), with identical output."""
    from gemma_mesh.common.tensors import to_tensor_pb
    from gemma_mesh.model.audio_io import decode_audio
    from gemma_mesh.proto.v1 import common_pb2

    tokens = tiny_bundle.encode_audio(decode_audio(librivox_clips[0], 16000))
    lengths = [48, 80, tokens.shape[0]]

    def request(n: int) -> decoder_pb2.GenerateRequest:
        soft = decoder_pb2.SoftTokens(modality=common_pb2.AUDIO, tokens=to_tensor_pb(tokens[:n]))
        content = [
            decoder_pb2.ContentPart(soft_tokens=soft),
            decoder_pb2.ContentPart(text="Transcribe this."),
        ]
        return _request([decoder_pb2.Message(role="user", content=content)], max_tokens=8)

    results = {}
    for label, cache_bytes in (("on", 64 * MiB), ("off", 0)):
        with ServerThread(
            lambda cb=cache_bytes: start_decoder(_settings(prefix_cache_bytes=cb), tiny_bundle)
        ) as srv:
            channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=message_options(64 * MiB))
            results[label] = [_collect(decoder_pb2_grpc.DecoderStub(channel), request(n)) for n in lengths]
            channel.close()
    assert [r[0] for r in results["on"]] == [r[0] for r in results["off"]]
    cached = [r[3].usage.cached_prompt_tokens for r in results["on"]]
    # Each later prompt reuses exactly the prompt up to the previous audio's end.
    audio_at = (
        tiny_bundle.prompt_builder.build(
            [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe this."}]}],
            audio_soft_tokens=[lengths[0]],
        )
        .input_ids.tolist()
        .index(tiny_bundle.manifest.token_id("audio"))
    )
    assert cached == [0, audio_at + lengths[0], audio_at + lengths[1]]


def _exact_length_prompt(bundle, length: int) -> list[dict]:
    for k in range(1, 400):
        text = "ab " * k
        n = len(_prompt_ids(bundle, [{"role": "user", "content": text}]))
        for extra in ("", "c", "cd", "cde"):
            msg = [{"role": "user", "content": text + extra}]
            if len(_prompt_ids(bundle, msg)) == length:
                return msg
        if n > length:
            break
    raise AssertionError(f"no prompt of exactly {length} tokens")


@pytest.mark.parametrize("offset", ["window-1", "window", "window+1", "3*window"])
def test_sliding_window_boundaries(stub, tiny_bundle, torch_reference, offset):
    window = tiny_bundle.manifest.text.sliding_window
    length = {"window-1": window - 1, "window": window, "window+1": window + 1, "3*window": 3 * window}[
        offset
    ]
    messages = _exact_length_prompt(tiny_bundle, length)
    ids, _, _, _ = _collect(stub, _request([_text("user", messages[0]["content"])], max_tokens=window + 4))
    expected = reference_generate(torch_reference, _prompt_ids(tiny_bundle, messages), window + 4)
    assert ids == expected


@pytest.mark.parametrize("interval", [2, 5, 256])
def test_a_stream_interval_sends_fewer_deltas_with_the_same_text(stub, interval):
    """Held deltas: every answer message but the last carries ``interval`` token ids or more, and the
    ids, text and usage equal the token-by-token stream's."""
    messages = [_text("user", "Tell me a long story about a lighthouse.")]
    plain = _request(messages, max_tokens=23, ignore_eos=True)
    held = _request(messages, max_tokens=23, ignore_eos=True, stream_interval_tokens=interval)
    ids, text, _, finished = _collect(stub, plain)
    held_ids, held_text, _, held_finished = _collect(stub, held)
    assert (held_ids, held_text) == (ids, text) and len(ids) == 23
    assert held_finished.usage.completion_tokens == finished.usage.completion_tokens == 23
    sizes = [len(r.delta.token_ids) for r in stub.Generate(held, timeout=120) if r.HasField("delta")]
    assert sum(sizes) == 23 and all(n >= interval for n in sizes[:-1])
    assert len(sizes) <= -(-23 // interval)  # no more messages than the interval allows


def test_stop_strings_end_the_answer(stub):
    base = _request([_text("user", "Say something long.")], max_tokens=24)
    _, text, _, _ = _collect(stub, base)
    assert len(text) > 4
    stop = text[2:4]
    _, stopped, _, finished = _collect(
        stub, _request([_text("user", "Say something long.")], max_tokens=24, stop=[stop])
    )
    assert stopped == text[: text.find(stop)] and finished.reason == decoder_pb2.STOP


def test_cancellation_frees_the_slot(tiny_bundle):
    with ServerThread(
        lambda: start_decoder(_settings(max_batch_size=1, max_queue_size=0), tiny_bundle)
    ) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        s = decoder_pb2_grpc.DecoderStub(channel)
        long_call = s.Generate(_request([_text("user", "Go on forever.")], max_tokens=100_000), timeout=60)
        first = next(long_call)  # the slot is taken
        assert first.HasField("delta")
        with pytest.raises(grpc.RpcError) as busy:
            _collect(s, _request([_text("user", "Me too.")], max_tokens=3))
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        long_call.cancel()
        deadline = time.monotonic() + 10
        while srv.engine._decoding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.engine._decoding
        ids, _, _, _ = _collect(s, _request([_text("user", "Me too.")], max_tokens=3))
        assert 1 <= len(ids) <= 3
        # An expired deadline frees the slot the same way.
        with pytest.raises(grpc.RpcError) as late:
            _collect(s, _request([_text("user", "Go on forever.")], max_tokens=100_000), timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while srv.engine._decoding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.engine._decoding
        channel.close()


def _soft(modality, n, hidden, frames=()):
    tokens = to_tensor_pb(np.zeros((n, hidden), dtype=np.float32))
    return decoder_pb2.ContentPart(
        soft_tokens=decoder_pb2.SoftTokens(modality=modality, tokens=tokens, frames=frames)
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("empty messages", "messages"),
        ("unknown role", "role"),
        ("wrong hidden size", "shape"),
        ("video frames mismatch", "frames"),
        ("max_tokens 0", "max_tokens"),
        ("top_p 0", "top_p"),
        ("top_p 1.5", "top_p"),
        ("over the context", "context"),
        ("corrupt tensor", "bytes"),
        ("prediction ids and text", "prediction"),
        ("prediction id outside the vocabulary", "prediction.token_ids"),
        ("stream interval over the limit", "stream_interval_tokens"),
        ("negative stream interval", "stream_interval_tokens"),
    ],
)
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(stub, tiny_bundle, case, needle):
    hidden = tiny_bundle.manifest.text.hidden_size
    user = [_text("user", "hi")]
    request = {
        "empty messages": _request([]),
        "unknown role": _request([_text("wizard", "hi")]),
        "wrong hidden size": _request([decoder_pb2.Message(role="user", content=[_soft(common_pb2.IMAGE, 4, hidden + 1)])]),
        "video frames mismatch": _request(
            [decoder_pb2.Message(role="user", content=[_soft(common_pb2.VIDEO, 6, hidden, [decoder_pb2.VideoFrame(timestamp_s=0, num_soft_tokens=5)])])]
        ),
        "max_tokens 0": _request(user, max_tokens=0),
        "top_p 0": _request(user, sampling=decoder_pb2.SamplingParams(temperature=1.0, top_p=0.0)),
        "top_p 1.5": _request(user, sampling=decoder_pb2.SamplingParams(temperature=1.0, top_p=1.5)),
        "over the context": _request(user, max_tokens=tiny_bundle.manifest.text.max_position_embeddings),
        "corrupt tensor": _request(
            [decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(soft_tokens=decoder_pb2.SoftTokens(
                modality=common_pb2.IMAGE, tokens=common_pb2.Tensor(shape=[4, hidden], dtype=common_pb2.FLOAT32, data=b"x")))])]
        ),
        "prediction ids and text": _request(user, prediction=decoder_pb2.Prediction(token_ids=[5], text="a")),
        "prediction id outside the vocabulary": _request(
            user, prediction=decoder_pb2.Prediction(token_ids=[1, tiny_bundle.manifest.text.vocab_size])
        ),
        "stream interval over the limit": _request(user, stream_interval_tokens=257),
        "negative stream interval": _request(user, stream_interval_tokens=-1),
    }[case]  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    ids, _, _, _ = _collect(stub, _request(user, max_tokens=2))
    assert len(ids) >= 1


def test_error_detail_and_metrics(decoder, stub):
    import grpc.aio

    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, _request([_text("user", "x")], max_tokens=-1))
    detail = dict(err.value.trailing_metadata() or ())
    assert "gemma-mesh-error-bin" in detail
    assert common_pb2.ErrorDetail.FromString(detail["gemma-mesh-error-bin"]).param == "max_tokens"
    assert error_detail  # the aio helper exists for async clients
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{decoder.metrics_port}/metrics", timeout=10).read().decode()
    )
    for name in (
        "gemma_mesh_decoder_time_to_first_token_seconds_bucket",
        "gemma_mesh_decoder_inter_token_latency_seconds_bucket",
        "gemma_mesh_decoder_prompt_tokens_total",
        "gemma_mesh_decoder_generated_tokens_total",
        "gemma_mesh_decoder_batch_size_bucket",
        "gemma_mesh_decoder_queue_depth",
        "gemma_mesh_decoder_prefix_cache_hit_ratio",
        "gemma_mesh_decoder_kv_cache_bytes",
        'gemma_mesh_decoder_errors_total{code="INVALID_ARGUMENT"}',
    ):
        assert name in body, name
    assert threading.active_count() < 200


def test_waiting_requests_are_admitted_by_priority_then_arrival(tiny_bundle):
    """One row: while it is busy, three priority-2 requests queue, then a priority-0 one; the
    priority-0 one runs first, the others in arrival order (vLLM's priority policy)."""
    with ServerThread(
        lambda: start_decoder(_settings(max_batch_size=1, max_queue_size=8), tiny_bundle)
    ) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        s = decoder_pb2_grpc.DecoderStub(channel)
        busy = s.Generate(
            _request([_text("user", "Keep going.")], max_tokens=600, ignore_eos=True), timeout=60
        )
        assert next(busy).HasField("delta")  # the only row is taken
        order: list[str] = []
        lock = threading.Lock()

        def run(name: str, priority: int) -> None:
            _collect(s, _request([_text("user", f"Request {name}.")], max_tokens=2, priority=priority))
            with lock:
                order.append(name)

        threads = []
        for name, priority in (("late-a", 2), ("late-b", 2), ("late-c", 2), ("urgent", 0)):
            threads.append(threading.Thread(target=run, args=(name, priority)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(srv.engine._waiting) < len(threads) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(srv.engine._waiting) == len(threads)  # queued behind the busy row
        assert srv.engine._decoding  # the busy request is still running: nothing was admitted yet
        for _ in busy:
            pass
        for thread in threads:
            thread.join(timeout=60)
        assert order == ["urgent", "late-a", "late-b", "late-c"]
        channel.close()


def test_a_long_text_prediction_is_cut_to_what_can_be_used(tiny_bundle):
    """A 9 MB predicted text with max_tokens 16: only its start is tokenized (the cut depends on
    max_tokens, not on the text), giving the same first tokens as the whole text would."""
    from gemma_mesh.decoder.servicer import max_token_chars, prediction_from_pb

    text = "the lighthouse keeper read the letter twice. " * 200_000
    ids = prediction_from_pb(decoder_pb2.Prediction(text=text), tiny_bundle, 16)
    head = tiny_bundle.tokenizer.encode(text[:5000], add_special_tokens=False).ids
    assert ids.tolist() == head[:16]
    assert 16 * max_token_chars(tiny_bundle) < 5000 < len(text)
    many = prediction_from_pb(decoder_pb2.Prediction(token_ids=[5] * 100_000), tiny_bundle, 16)
    assert many.tolist() == [5] * 16
