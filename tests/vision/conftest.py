"""An in-process vision encoder on a loopback port (port 0), one per test module, and its client stub."""

from __future__ import annotations

import pytest_asyncio

from gemma_mesh.common.grpc_server import open_channel
from gemma_mesh.common.settings import MiB
from gemma_mesh.proto.v1 import vision_pb2_grpc
from gemma_mesh.vision.server import VisionServer
from gemma_mesh.vision.settings import VisionSettings


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def vision_server(tiny_bundle):
    server = VisionServer(VisionSettings(host="127.0.0.1", port=0, batch_wait_ms=20.0, max_batch_size=8))
    await server.start(tiny_bundle)
    yield server
    await server.stop(0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def vision_stub(vision_server):
    channel = open_channel(f"127.0.0.1:{vision_server.port}", 64 * MiB)
    yield vision_pb2_grpc.VisionEncoderStub(channel)
    await channel.close()
