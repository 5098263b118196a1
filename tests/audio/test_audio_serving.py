"""``audio.serving`` and the servicer's stream plumbing, without a network: limits, overload, coalescing."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from audio_helpers import s16

from gemma_mesh.audio.server import AudioServer
from gemma_mesh.audio.servicer import coalesced_pcm
from gemma_mesh.audio.serving import AudioEngine
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.common.errors import InvalidRequest, Overloaded
from gemma_mesh.common.grpc_server import open_channel
from gemma_mesh.common.settings import MiB
from gemma_mesh.proto.v1 import audio_pb2, audio_pb2_grpc


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> AudioEngine:
    return AudioEngine(tiny_bundle, AudioSettings(port=0, max_streams=1, max_split_audio_s=45))


def test_stream_slots_are_limited_and_released(engine):
    first = engine.open_stream("s16le", 16_000, 1)
    with pytest.raises(Overloaded, match="limit is 1"):
        engine.open_stream("s16le", 16_000, 1)
    first.close()
    first.close()  # idempotent
    engine.open_stream("f32le", 48_000, 2).close()


def test_clip_limits(engine):
    with pytest.raises(InvalidRequest, match="empty"):
        engine.encode_clip(np.zeros(0, np.float32))
    with pytest.raises(InvalidRequest, match="too short"):
        engine.encode_clip(np.zeros(100, np.float32))
    with pytest.raises(InvalidRequest, match="limit of 45 s for a split clip"):
        engine.encode_clip(np.zeros(46 * 16_000, np.float32), split_long_audio=True)
    clip = engine.encode_clip(np.zeros(30 * 16_000, np.float32))
    assert [s.tokens.shape[0] for s in clip.segments] == [750] and clip.segments[0].end_ms == 30_000
    just_over = np.zeros(30 * 16_000 + 100, np.float32)  # silence: any cut is quietest; none leaves a sliver
    first, second = engine.encode_clip(just_over, split_long_audio=True).segments
    assert second.end_ms - second.start_ms >= 1_000 and first.end_ms == second.start_ms


def _messages(*chunks: bytes, config_again: bool = False):
    async def gen():
        for chunk in chunks:
            yield audio_pb2.AudioStreamRequest(pcm=chunk)
            await asyncio.sleep(0)
        if config_again:
            yield audio_pb2.AudioStreamRequest(config=audio_pb2.AudioStreamConfig())

    return gen()


@pytest.mark.asyncio
async def test_coalescing_joins_queued_chunks_in_order_within_the_limit():
    chunks = [bytes([i]) * 100 for i in range(20)]
    out = []
    async for data in coalesced_pcm(_messages(*chunks), max_bytes=450):
        out.append(data)
        await asyncio.sleep(0.01)  # a slow encoder: chunks queue up meanwhile
    assert b"".join(out) == b"".join(chunks)
    assert all(len(d) <= 450 for d in out) and len(out) < 20


@pytest.mark.asyncio
async def test_coalescing_reports_errors_after_the_chunks_before_them():
    out = []
    with pytest.raises(InvalidRequest, match="config may be sent only once"):
        async for data in coalesced_pcm(_messages(b"ab", b"cd", config_again=True), max_bytes=1_000):
            out.append(data)
    assert b"".join(out) == b"abcd"
    with pytest.raises(InvalidRequest, match="more than the limit of 10"):
        async for _ in coalesced_pcm(_messages(b"x" * 11), max_bytes=10):
            pass


@pytest.mark.asyncio
async def test_unavailable_while_loading_and_cancelled_streams_free_their_slot(tiny_bundle):
    server = AudioServer(AudioSettings(port=0, max_streams=1))
    await server.server.start()  # serving, no bundle yet
    channel = open_channel(f"127.0.0.1:{server.port}", 64 * MiB)
    stub = audio_pb2_grpc.AudioFrontendStub(channel)
    pcm = audio_pb2.PcmAudio(
        data=s16(np.zeros(1_600)), encoding=audio_pb2.S16LE, sample_rate_hz=16_000, channels=1
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Encode(audio_pb2.EncodeAudioRequest(pcm=pcm))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()

    server.servicer.engine = AudioEngine(tiny_bundle, server.settings)
    config = audio_pb2.AudioStreamConfig(encoding=audio_pb2.S16LE, sample_rate_hz=16_000, channels=1)
    for _ in range(3):  # with one slot, each stream must give it back when cancelled
        call = stub.EncodeStream()
        await call.write(audio_pb2.AudioStreamRequest(config=config))
        await call.write(audio_pb2.AudioStreamRequest(pcm=s16(np.zeros(3_200))))
        await call.read()
        call.cancel()
        for _ in range(100):
            if server.servicer.engine._streams == 0:
                break
            await asyncio.sleep(0.01)
        assert server.servicer.engine._streams == 0
    await channel.close()
    await server.stop(0)
