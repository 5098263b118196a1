"""A backend replica SIGKILLed mid-stream under live sessions: two decoder (or audio frontend)
processes behind the gateway's round-robin; in-flight caption work is retried on the other one,
every segment gets exactly one final, and the killed replica rejoins when restarted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import websockets
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gemma_mesh.gateway.protocol import MediaKind, pack_media
from gemma_mesh.model.audio_io import decode_audio
from tests.gateway.mesh import GatewayThread, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")
REPO = Path(__file__).resolve().parents[2]
RATE = 16000
SESSIONS = 8


class Replica:
    """``gemma-mesh serve NAME`` (the embedded tiny bundle) on a fixed port: killed and restarted there."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.port, self.metrics_port = free_port(), free_port()
        self.log = log_dir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            f"GEMMA_MESH_{self.name.upper()}_INTRA_OP_THREADS": "1",
            "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        argv = [sys.executable, "-m", "gemma_mesh.cli", "--log-level", "WARNING", "serve", self.name]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"{self.name} on {self.port} not healthy"
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("replicas")
    started = {name: [Replica(name, log_dir), Replica(name, log_dir)] for name in ("decoder", "audio")}
    try:
        for pair in started.values():
            for replica in pair:
                replica.start()
        for pair in started.values():
            for replica in pair:
                replica.wait_healthy()
        yield started
    finally:
        for pair in started.values():
            for replica in pair:
                replica.kill()


@pytest.fixture(scope="module")
def speech(librivox_clips) -> np.ndarray:
    gap = np.zeros(int(1.2 * RATE), np.float32)
    return np.concatenate(
        [decode_audio(librivox_clips[0], RATE), gap, decode_audio(librivox_clips[1], RATE), gap]
    )


def target(pair: list[Replica]) -> str:
    """Both replicas as one gRPC target (the ``ipv4:`` resolver; the channel round-robins over them)."""
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in pair)


async def live_session(url: str, speech: np.ndarray, started: asyncio.Event) -> list[dict]:
    """Stream ``speech`` at twice real time, end the session, return every event."""
    events: list[dict] = []
    async with websockets.connect(url.replace("http", "ws", 1) + "/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start"}))

        async def read() -> None:
            while not events or events[-1]["type"] != "session.ended":
                events.append(json.loads(await ws.recv()))

        reader = asyncio.create_task(read())
        pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
        chunk = 3200  # 100 ms
        for offset in range(0, len(pcm), chunk):
            await ws.send(pack_media(MediaKind.AUDIO, offset // 32, pcm[offset : offset + chunk]))
            await asyncio.sleep(0.05)
            if offset > len(pcm) // 4:
                started.set()  # a quarter in: segments open, decodes in flight
        await ws.send(json.dumps({"type": "session.end"}))
        async with asyncio.timeout(240):
            await reader
    return events


def check_captions(events: list[dict], min_finals: int = 2) -> None:
    assert events[-1]["type"] == "session.ended"
    errors = [e for e in events if e["type"] == "error"]
    assert not errors, errors
    finals = [e for e in events if e["type"] == "caption.final"]
    # One final per segment, in order: none lost (ids contiguous), none duplicated.
    assert len(finals) >= min_finals and [f["segment_id"] for f in finals] == list(range(len(finals)))
    assert all(f["text"] for f in finals)


@pytest.mark.parametrize("killed", ["decoder", "audio"])
async def test_a_replica_killed_mid_stream_loses_no_final_and_rejoins(backends, replicas, speech, killed):
    decoders, audios = replicas["decoder"], replicas["audio"]
    settings = backends.gateway_settings(decoder_target=target(decoders), audio_target=target(audios))
    victim = replicas[killed][0]
    with GatewayThread(settings) as url:
        started = asyncio.Event()
        sessions = [asyncio.create_task(live_session(url, speech, started)) for _ in range(SESSIONS)]
        await asyncio.wait_for(started.wait(), 120)
        # Kill it while it holds work: decoder sequences, or open audio streams.
        busy = (
            "gemma_mesh_decoder_active_sequences"
            if killed == "decoder"
            else "gemma_mesh_audio_active_streams"
        )
        async with asyncio.timeout(60):
            while await asyncio.to_thread(victim.metric, busy) < 1:
                await asyncio.sleep(0.02)
        victim.kill()
        results = await asyncio.gather(*sessions)
        for events in results:
            check_captions(events)
        metrics = httpx.get(f"{url}/metrics").text
        # What was in flight on it when it died was redone on the other replica.
        redone = "caption_decode_retried" if killed == "decoder" else "audio_stream_reopened"
        assert re.search(rf'^gemma_mesh_gateway_warnings_total{{code="{redone}"}} [1-9]', metrics, re.M)

        # The replica rejoins on its port: new sessions reach it again.
        victim.start()
        victim.wait_healthy()
        metric = (
            "gemma_mesh_decoder_requests_total" if killed == "decoder" else "gemma_mesh_audio_seconds_total"
        )
        before = victim.metric(metric)
        deadline = time.monotonic() + 120
        while victim.metric(metric) <= before:
            assert time.monotonic() < deadline, f"the restarted {killed} got no work"
            check_captions(await live_session(url, speech[: 6 * RATE], asyncio.Event()), min_finals=1)
