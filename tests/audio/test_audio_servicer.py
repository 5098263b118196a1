"""The audio frontend through a real gRPC server on a loopback port.

Outputs equal the in-process bundle encoders; streaming equals whole-clip; concurrent clients get their
own results; bad input gets INVALID_ARGUMENT with a message while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools

import grpc
import numpy as np
import pytest
from audio_helpers import s16, wav_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from gemma_mesh.audio.servicer import SERVICE_NAME
from gemma_mesh.common.grpc_server import error_detail
from gemma_mesh.common.tensors import from_tensor_pb
from gemma_mesh.model.audio_io import decode_audio, resample
from gemma_mesh.proto.v1 import audio_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")
RATE = 16_000


@pytest.fixture(scope="module")
def speech(librivox_clips) -> np.ndarray:
    return decode_audio(librivox_clips[1], RATE)


def _pcm_request(data: bytes, rate=RATE, channels=1, encoding=audio_pb2.S16LE, split=False):
    pcm = audio_pb2.PcmAudio(data=data, encoding=encoding, sample_rate_hz=rate, channels=channels)
    return audio_pb2.EncodeAudioRequest(pcm=pcm, split_long_audio=split)


def _file_request(data: bytes, declared=0, split=False):
    file = audio_pb2.EncodedAudio(data=data, declared_sample_rate_hz=declared)
    return audio_pb2.EncodeAudioRequest(file=file, split_long_audio=split)


async def _stream(stub, pcm: bytes, chunk_bytes: int, rate=RATE, channels=1):
    async def requests():
        config = audio_pb2.AudioStreamConfig(encoding=audio_pb2.S16LE, sample_rate_hz=rate, channels=channels)
        yield audio_pb2.AudioStreamRequest(config=config)
        for i in range(0, len(pcm), chunk_bytes):
            yield audio_pb2.AudioStreamRequest(pcm=pcm[i : i + chunk_bytes])

    return [m async for m in stub.EncodeStream(requests())]


def _joined(messages) -> np.ndarray:
    return np.concatenate([from_tensor_pb(m.soft_tokens) for m in messages])


def _assembled(messages) -> np.ndarray:
    """Tokens of a stream whose end message rewound it: each response replaces from its first_token."""
    tokens = np.zeros((0, from_tensor_pb(messages[0].soft_tokens).shape[1]), np.float32)
    for m in messages:
        tokens = np.concatenate([tokens[: m.first_token], from_tensor_pb(m.soft_tokens)])
    return tokens


async def _stream_with_end(stub, pcm: bytes, chunk_bytes: int, end_samples: int, rate=RATE, after=None):
    async def requests():
        config = audio_pb2.AudioStreamConfig(encoding=audio_pb2.S16LE, sample_rate_hz=rate, channels=1)
        yield audio_pb2.AudioStreamRequest(config=config)
        for i in range(0, len(pcm), chunk_bytes):
            yield audio_pb2.AudioStreamRequest(pcm=pcm[i : i + chunk_bytes])
        yield audio_pb2.AudioStreamRequest(end=audio_pb2.AudioStreamEnd(samples=end_samples))
        if after is not None:
            yield after

    return [m async for m in stub.EncodeStream(requests())]


async def test_health_and_reflection(audio_server):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{audio_server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for name in (SERVICE_NAME, ""):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for r in replies for s in r.list_services_response.service]
    assert SERVICE_NAME in names
    await channel.close()


async def test_files_and_pcm_equal_the_bundle(audio_stub, tiny_bundle, speech, librivox_clips):
    clip = librivox_clips[1]
    reply = await audio_stub.Encode(_file_request(clip.read_bytes(), declared=RATE))
    (segment,) = reply.segments
    expected = tiny_bundle.encode_audio(speech)
    assert np.array_equal(from_tensor_pb(segment.soft_tokens), expected)
    assert segment.num_soft_tokens == expected.shape[0]
    assert (segment.range.start_ms, segment.range.end_ms) == (0, round(len(speech) / 16))
    assert reply.audio_seconds == pytest.approx(len(speech) / RATE)

    # 48 kHz stereo f32 PCM: resampled with soxr and downmixed, like the in-process path
    short = speech[: 2 * RATE]
    hi = resample(short, RATE, 48_000)
    stereo = np.stack([hi, hi * 0.5], axis=1).astype("<f4")
    reply = await audio_stub.Encode(_pcm_request(stereo.tobytes(), 48_000, 2, audio_pb2.F32LE))
    expected = tiny_bundle.encode_audio(resample(stereo.mean(axis=1), 48_000, RATE))
    assert np.abs(from_tensor_pb(reply.segments[0].soft_tokens) - expected).max() <= 1e-6


async def test_long_clips_are_refused_or_split(audio_stub, tiny_bundle, speech):
    long = np.resize(speech, 40 * RATE).astype(np.float32)
    long[23 * RATE : 23 * RATE + 800] = 0.0  # a 50 ms pause inside the search window (25-30 s)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audio_stub.Encode(_pcm_request(s16(long)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 30 s" in err.value.details() and "split_long_audio" in err.value.details()

    long[27 * RATE : 27 * RATE + 800] = 0.0
    reply = await audio_stub.Encode(_pcm_request(s16(long), split=True))
    assert len(reply.segments) == 2
    first, second = reply.segments
    assert 27_000 <= first.range.end_ms <= 27_050 and second.range.start_ms == first.range.end_ms
    assert second.range.end_ms == 40_000
    pcm = np.frombuffer(s16(long), "<i2").astype(np.float32) / 32768
    cut = round(first.range.end_ms * 16)
    assert np.array_equal(from_tensor_pb(first.soft_tokens), tiny_bundle.encode_audio(pcm[:cut]))
    assert np.array_equal(from_tensor_pb(second.soft_tokens), tiny_bundle.encode_audio(pcm[cut:]))


@pytest.mark.parametrize("chunk_ms", [40, 480])
async def test_stream_equals_whole_clip(audio_stub, tiny_bundle, speech, chunk_ms):
    clip = speech[: 3 * RATE]
    pcm = s16(clip)
    messages = await _stream(audio_stub, pcm, 2 * 16 * chunk_ms)
    whole = tiny_bundle.encode_audio(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768)
    tokens = _joined(messages)
    assert tokens.shape == whole.shape and np.abs(tokens - whole).max() <= 1e-4
    assert sum(m.num_soft_tokens for m in messages) == whole.shape[0]
    assert messages[0].range.start_ms == 0 and messages[-1].range.end_ms == round(len(clip) / 16)
    assert all(a.range.end_ms == b.range.start_ms for a, b in itertools.pairwise(messages))


async def test_tokens_leave_as_soon_as_they_are_final(audio_stub, speech):
    """A lock-step client: after each 100 ms chunk, every token that is final arrives without more input."""
    call = audio_stub.EncodeStream()
    config = audio_pb2.AudioStreamConfig(encoding=audio_pb2.S16LE, sample_rate_hz=RATE, channels=1)
    await call.write(audio_pb2.AudioStreamRequest(config=config))
    received = sent = 0
    for i in range(10):
        chunk = speech[i * 1_600 : (i + 1) * 1_600]
        await call.write(audio_pb2.AudioStreamRequest(pcm=s16(chunk)))
        sent += len(chunk)
        frames = -(-(sent - 160) // 160)  # log-mel frames whose window is complete
        final = max(0, (frames - 4) // 4 + 1)  # tokens whose frames, lookahead included, are final
        while received < final:
            message = await asyncio.wait_for(call.read(), timeout=10)
            assert message.range.start_ms == 40 * received
            received += message.num_soft_tokens
        assert received == final
    await call.done_writing()
    while (message := await call.read()) != grpc.aio.EOF:
        received += message.num_soft_tokens
    assert received == 25  # 1 s = 25 tokens in all


async def test_a_provisional_tail_covers_every_chunk_sent(audio_stub, tiny_bundle, speech):
    """``provisional_tail``: after each 100 ms chunk (lock-step), the tokens held, tail included,
    are ``Encode`` of all the PCM sent so far; the next response replaces the tail."""
    call = audio_stub.EncodeStream()
    config = audio_pb2.AudioStreamConfig(
        encoding=audio_pb2.S16LE, sample_rate_hz=RATE, channels=1, provisional_tail=True
    )
    await call.write(audio_pb2.AudioStreamRequest(config=config))
    messages, pcm = [], b""
    for i in range(8):
        chunk = s16(speech[i * 1_600 : (i + 1) * 1_600])
        pcm += chunk
        await call.write(audio_pb2.AudioStreamRequest(pcm=chunk))
        while not messages or not messages[-1].provisional or messages[-1].range.end_ms < 100 * (i + 1):
            messages.append(await asyncio.wait_for(call.read(), timeout=10))
        whole = tiny_bundle.encode_audio(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768)
        held = _assembled(messages)
        assert held.shape == whole.shape and np.abs(held - whole).max() <= 1e-4
        assert messages[-1].range.end_ms == 100 * (i + 1) and 1 <= messages[-1].num_soft_tokens <= 2
    await call.done_writing()
    while (message := await call.read()) != grpc.aio.EOF:
        messages.append(message)
    assert not messages[-1].provisional and _assembled(messages).shape == (20, whole.shape[1])


async def test_stream_at_48k_stereo_equals_encode(audio_stub, speech):
    hi = resample(speech[: 2 * RATE], RATE, 48_000)
    pcm = s16(np.stack([hi, -hi], axis=1) * 0.5 + 0.1)
    streamed = _joined(await _stream(audio_stub, pcm, 4 * 4_800, rate=48_000, channels=2))
    reply = await audio_stub.Encode(_pcm_request(pcm, 48_000, 2))
    assert np.abs(streamed - from_tensor_pb(reply.segments[0].soft_tokens)).max() <= 1e-4


async def test_sixteen_concurrent_clients_get_their_own_results(audio_stub, tiny_bundle, speech):
    clips = [speech[i * 1_000 : i * 1_000 + RATE + 400 * i] for i in range(16)]
    pcms = [s16(c) for c in clips]
    solo = [tiny_bundle.encode_audio(np.frombuffer(p, "<i2").astype(np.float32) / 32768) for p in pcms]
    encodes = [audio_stub.Encode(_pcm_request(p)) for p in pcms[:8]]
    streams = [_stream(audio_stub, p, 3_200) for p in pcms[8:]]
    results = await asyncio.gather(*encodes, *streams)
    for i, result in enumerate(results):
        got = from_tensor_pb(result.segments[0].soft_tokens) if i < 8 else _joined(result)
        assert got.shape == solo[i].shape and np.abs(got - solo[i]).max() <= 1e-4, i


BAD_REQUESTS = {
    "empty file": (_file_request(b""), "empty"),
    "corrupt file": (_file_request(b"\x00garbage" * 50), "decode"),
    "truncated wav": (_file_request(wav_bytes(np.zeros(8_000, np.float32))[:3_000]), "truncated"),
    "declared rate": (_file_request(wav_bytes(np.zeros(1_600, np.float32)), declared=8_000), "contradicts"),
    "nan samples": (_pcm_request(np.array([0, np.nan], "<f4").tobytes(), encoding=audio_pb2.F32LE), "NaN"),
    "inf samples": (
        _pcm_request(np.array([np.inf] * 4, "<f4").tobytes(), encoding=audio_pb2.F32LE),
        "infinite",
    ),
    "zero channels": (_pcm_request(b"\x00" * 64, channels=0), "zero channels"),
    "no encoding": (_pcm_request(b"\x00" * 64, encoding=audio_pb2.PCM_ENCODING_UNSPECIFIED), "S16LE"),
    "bad rate": (_pcm_request(b"\x00" * 64, rate=0), "sample_rate_hz"),
    "odd bytes": (_pcm_request(b"\x00" * 63), "whole number"),
    "no source": (audio_pb2.EncodeAudioRequest(), "pcm or file"),
    "too short": (_pcm_request(b"\x00\x00" * 100), "too short"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_input_is_invalid_argument(audio_stub, case):
    request, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audio_stub.Encode(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert error_detail(err.value).code == "invalid_request_error"
    reply = await audio_stub.Encode(_pcm_request(s16(np.zeros(1_600, np.float32))))  # still serving
    assert reply.segments[0].num_soft_tokens == 3


async def test_bad_streams_are_invalid_argument(audio_stub):
    async def no_config():
        yield audio_pb2.AudioStreamRequest(pcm=b"\x00\x00")

    async def zero_channels():
        yield audio_pb2.AudioStreamRequest(
            config=audio_pb2.AudioStreamConfig(encoding=1, sample_rate_hz=RATE)
        )

    async def nan_chunk():
        config = audio_pb2.AudioStreamConfig(encoding=audio_pb2.F32LE, sample_rate_hz=RATE, channels=1)
        yield audio_pb2.AudioStreamRequest(config=config)
        yield audio_pb2.AudioStreamRequest(pcm=np.zeros(800, "<f4").tobytes())
        yield audio_pb2.AudioStreamRequest(pcm=np.array([np.nan] * 8, "<f4").tobytes())

    for requests, message in [(no_config, "config"), (zero_channels, "zero channels"), (nan_chunk, "NaN")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in audio_stub.EncodeStream(requests())]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert len(_joined(await _stream(audio_stub, s16(np.zeros(3_200, np.float32)), 640))) == 5


@pytest.mark.parametrize("overshoot_ms", [0, 300, 900])
async def test_a_stream_ended_before_its_last_samples_equals_encoding_the_shorter_clip(
    audio_stub, tiny_bundle, speech, overshoot_ms
):
    """A live segment ends in the silence after its speech, after partials streamed past that end."""
    pcm = s16(np.resize(speech, 6 * RATE))  # the clip is 3 s: repeated to 6 s
    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768  # what the server decodes
    end = 4 * RATE + 333
    messages = await _stream_with_end(audio_stub, pcm[: 2 * (end + 16 * overshoot_ms)], 3_200, end)
    expected = tiny_bundle.encode_audio(audio[:end])
    tokens = _assembled(messages)
    assert tokens.shape == expected.shape
    assert np.abs(tokens - expected).max() <= 1e-4
    assert messages[-1].range.end_ms == round(end / 16)
    # Blocks are contiguous (each starts where the previous ended) except at the end, which may
    # rewind once (how many step blocks come first depends on how the server coalesced the chunks).
    position, rewinds = 0, 0
    for m in messages:
        if m.first_token != position:
            assert m.first_token < position, (m.first_token, position)
            rewinds += 1
        position = m.first_token + m.num_soft_tokens
    assert rewinds <= 1 and position == expected.shape[0]


async def test_a_stream_at_48k_ends_at_its_own_sample_count(audio_stub, tiny_bundle, speech):
    wav48 = resample(speech[: int(2.9 * RATE)], RATE, 48_000)
    messages = await _stream_with_end(audio_stub, s16(wav48), 9_600, 2 * 48_000, rate=48_000)
    whole = await audio_stub.Encode(_pcm_request(s16(wav48[: 2 * 48_000]), rate=48_000))
    assert _assembled(messages).shape[0] == whole.segments[0].num_soft_tokens == 50


async def test_bad_stream_ends_are_invalid_argument(audio_stub, speech):
    pcm = s16(np.resize(speech, 8 * RATE).astype(np.float32))
    extra = audio_pb2.AudioStreamRequest(pcm=b"\x00\x00")
    for end, after, message in [
        (-1, None, ">= 0"),
        (8 * RATE + 16, None, "samples were inserted"),
        (2 * RATE, None, "kept for rewinding"),  # 6 s back, over stream_rewind_ms
        (8 * RATE, extra, "nothing may follow"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _stream_with_end(audio_stub, pcm, 16_000, end, after=after)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert len(_joined(await _stream(audio_stub, s16(np.zeros(3_200, np.float32)), 640))) == 5


async def test_metrics_count_audio_and_errors(audio_stub):
    await audio_stub.Encode(_pcm_request(s16(np.zeros(RATE, np.float32))))
    await _stream(audio_stub, s16(np.zeros(RATE, np.float32)), 3_200)
    with pytest.raises(grpc.aio.AioRpcError):
        await audio_stub.Encode(_file_request(b""))

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    assert value("gemma_mesh_audio_seconds_total", rpc="Encode") >= 1.0
    assert value("gemma_mesh_audio_seconds_total", rpc="EncodeStream") > 0
    assert value("gemma_mesh_audio_errors_total", rpc="Encode", code="INVALID_ARGUMENT") >= 1
    assert value("gemma_mesh_audio_real_time_factor_count", rpc="Encode") >= 1
    assert value("gemma_mesh_audio_request_seconds_count", rpc="EncodeStream") >= 1
    assert value("gemma_mesh_audio_active_streams") == 0


async def test_a_stream_ends_anywhere_a_caption_split_may_put_it(audio_stub, speech):
    """A live caption segment reaching the gateway's max_segment_ms (30 s) is split at its quietest
    point in the last split_search_ms (5 s): its stream, fed to 30 s, must end there with the
    default stream_rewind_ms (else the final falls back to encoding the segment whole, logged as a
    failure), and give what Encode of the segment gives."""
    from gemma_mesh.audio.settings import AudioSettings
    from gemma_mesh.gateway.captioning.vad import VadSettings

    search_ms = VadSettings().split_search_ms
    assert AudioSettings().stream_rewind_ms >= search_ms
    wav = np.resize(speech, 30 * RATE).astype(np.float32)
    end = (30_000 - search_ms + 40) * RATE // 1000  # the earliest split point, one token in
    messages = await _stream_with_end(audio_stub, s16(wav), 32_000, end)
    whole = await audio_stub.Encode(_pcm_request(s16(wav[:end])))
    expected = from_tensor_pb(whole.segments[0].soft_tokens)
    got = _assembled(messages)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
