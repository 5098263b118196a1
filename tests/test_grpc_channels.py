"""The channels between services: UNAVAILABLE retries of idempotent unary calls, keepalive pings.

Retries: one target resolving to two real vision encoders (a loading one that answers UNAVAILABLE,
a serving one), balanced round_robin as a headless Service's addresses are; with the retry policy
every call succeeds, without it the calls that land on the loading pod fail. Keepalive: a real
vision encoder process frozen with SIGSTOP (its sockets stay open, as a lost node's do) fails the
call in flight after the keepalive timeout instead of at the call's deadline; and the other way
round, a server cancels the open stream of a client process frozen the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from gemma_mesh.common.grpc_server import KeepaliveSettings, idempotent_unary_methods, open_channel
from gemma_mesh.common.settings import MiB
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import vision_pb2, vision_pb2_grpc
from gemma_mesh.vision.server import VisionServer
from gemma_mesh.vision.settings import VisionSettings
from tests.gateway.mesh import free_port
from tests.grpc_helpers import LoopThread
from tests.test_service_health import GatedBundle

REPO = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]


def test_only_idempotent_unary_calls_are_retried() -> None:
    methods = {f"{m['service']}/{m['method']}" for m in idempotent_unary_methods()}
    assert methods == {
        "grpc.health.v1.Health/Check",
        "gemma_mesh.v1.AudioFrontend/Encode",
        "gemma_mesh.v1.VisionEncoder/Encode",
        "gemma_mesh.v1.VisionEncoder/EncodeBatch",
        "gemma_mesh.v1.VisionEncoder/EncodeVideo",
        "gemma_mesh.v1.VisionEncoder/Describe",
    }


async def _describe_many(target: str, keepalive: KeepaliveSettings, calls: int) -> list[str]:
    """Status code names of ``calls`` Describe calls, after connecting to every address."""
    channel = open_channel(target, 64 * MiB, keepalive)
    stub = vision_pb2_grpc.VisionEncoderStub(channel)
    codes = []
    try:
        await asyncio.wait_for(channel.channel_ready(), 10)
        for _ in range(2 * calls):  # both subchannels connected before counting
            try:
                await stub.Describe(vision_pb2.DescribeRequest(), timeout=10)
            except grpc.aio.AioRpcError:
                pass
        for _ in range(calls):
            try:
                await stub.Describe(vision_pb2.DescribeRequest(), timeout=10)
                codes.append("OK")
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
    finally:
        await channel.close()
    return codes


def test_unavailable_from_a_loading_pod_is_retried_on_another() -> None:
    loading_bundle = GatedBundle()
    with LoopThread() as loop:

        async def make(bundle: ModelBundle | None) -> VisionServer:
            server = VisionServer(VisionSettings(host="127.0.0.1", port=0, providers=CPU))
            if bundle is not None:
                await server.start(bundle)
            return server

        serving = loop.run(make(ModelBundle(None, providers=CPU)))
        loading = loop.run(make(None))
        starting = loop.submit(loading.start(loading_bundle))  # stays loading: the gate is shut
        try:
            target = f"ipv4:127.0.0.1:{serving.port},127.0.0.1:{loading.port}"
            with_retries = asyncio.run(_describe_many(target, KeepaliveSettings(retry_attempts=3), 10))
            without = asyncio.run(_describe_many(target, KeepaliveSettings(retry_attempts=1), 10))
        finally:
            loading_bundle.gate.set()
            starting.result(timeout=60)
            loop.run(loading.stop(0))
            loop.run(serving.stop(0))
    assert with_retries == ["OK"] * 10
    assert "UNAVAILABLE" in without and "OK" in without


async def _call_through_a_frozen_peer(port: int, proc: subprocess.Popen) -> tuple[str, float]:
    # No retries: a retried attempt would reconnect to the frozen process, whose kernel still accepts
    # connections (a lost node's would not), and wait there for the deadline.
    keepalive = KeepaliveSettings(time_s=1.0, timeout_s=1.0, retry_attempts=1)
    channel = open_channel(f"127.0.0.1:{port}", 64 * MiB, keepalive)
    stub = vision_pb2_grpc.VisionEncoderStub(channel)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the process has loaded its bundle (UNAVAILABLE "still loading" before)
            try:
                await stub.Describe(vision_pb2.DescribeRequest(), timeout=30, wait_for_ready=True)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGSTOP)  # a node gone silent: no FIN, no RST
        started = time.monotonic()
        try:
            await stub.Describe(vision_pb2.DescribeRequest(), timeout=60)
            return "OK", time.monotonic() - started
        except grpc.aio.AioRpcError as error:
            return error.code().name, time.monotonic() - started
    finally:
        await channel.close()


def test_keepalive_fails_calls_to_a_silent_peer_before_their_deadline() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemma_mesh.vision", "--port", str(port), "--host", "127.0.0.1"],
        env={**env, "GEMMA_MESH_VISION_PROVIDERS": '["CPUExecutionProvider"]'},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code, elapsed = asyncio.run(_call_through_a_frozen_peer(port, proc))
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)
    assert code == "UNAVAILABLE"
    assert elapsed < 15  # keepalive: about time_s + timeout_s; without it, the 60 s deadline


@pytest.mark.parametrize("attempts", [1, 3])
def test_retry_attempts_switch_the_channel_retry_policy(attempts: int) -> None:
    from gemma_mesh.common.grpc_server import channel_options

    options = dict(channel_options(MiB, KeepaliveSettings(retry_attempts=attempts)))
    assert options["grpc.enable_retries"] == (1 if attempts > 1 else 0)
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert ("methodConfig" in options["grpc.service_config"]) == (attempts > 1)


_FROZEN_CLIENT = """
import sys, time, grpc
from gemma_mesh.proto.v1 import audio_pb2, audio_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
config = audio_pb2.AudioStreamConfig(encoding=audio_pb2.F32LE, sample_rate_hz=16000, channels=1)
def requests():
    yield audio_pb2.AudioStreamRequest(config=config)
    yield audio_pb2.AudioStreamRequest(pcm=bytes(4 * 1600))
    time.sleep(3600)
call = audio_pb2_grpc.AudioFrontendStub(channel).EncodeStream(requests())
print("open", flush=True)
for _ in call:
    pass
"""


def test_server_keepalive_cancels_the_stream_of_a_vanished_client() -> None:
    from prometheus_client import REGISTRY

    from gemma_mesh.audio.server import AudioServer
    from gemma_mesh.audio.settings import AudioSettings

    def open_streams() -> float:
        return REGISTRY.get_sample_value("gemma_mesh_audio_active_streams") or 0.0

    settings = AudioSettings(
        host="127.0.0.1", port=0, providers=CPU, keepalive_time_s=1.0, keepalive_timeout_s=1.0
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with LoopThread() as loop:

        async def start() -> AudioServer:
            server = AudioServer(settings)
            await server.start(ModelBundle(None, providers=CPU))
            return server

        server = loop.run(start())
        before = open_streams()
        client = subprocess.Popen(
            [sys.executable, "-c", _FROZEN_CLIENT, f"127.0.0.1:{server.port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert client.stdout.readline().strip() == b"open"
            deadline = time.monotonic() + 30
            while open_streams() < before + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert open_streams() == before + 1
            client.send_signal(signal.SIGSTOP)  # the client's node is gone: no FIN, no pings answered
            frozen = time.monotonic()
            while open_streams() > before and time.monotonic() < frozen + 30:
                time.sleep(0.1)
            assert open_streams() == before
            assert time.monotonic() - frozen < 15  # about keepalive_time_s + keepalive_timeout_s
        finally:
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.wait(timeout=10)
            loop.run(server.stop(0))
