"""An in-process audio frontend on a loopback port (port 0), one per test module, and its client stub."""

from __future__ import annotations

import pytest_asyncio

from gemma_mesh.audio.server import AudioServer
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.common.grpc_server import open_channel
from gemma_mesh.common.settings import MiB
from gemma_mesh.proto.v1 import audio_pb2_grpc


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def audio_server(tiny_bundle):
    server = AudioServer(AudioSettings(host="127.0.0.1", port=0, encode_threads=2))
    await server.start(tiny_bundle)
    yield server
    await server.stop(0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def audio_stub(audio_server):
    channel = open_channel(f"127.0.0.1:{audio_server.port}", 64 * MiB)
    yield audio_pb2_grpc.AudioFrontendStub(channel)
    await channel.close()
