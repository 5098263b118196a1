"""Readiness and liveness of the three gRPC services, through real servers on loopback ports.

A bundle whose sessions are held behind a gate stands in for a slow load (E4B's 7 GB
``embed_tokens``): until every graph is loaded and has run once, ``""`` and the service answer
NOT_SERVING while liveness answers SERVING and calls get UNAVAILABLE. A decoder whose ONNX Runtime
session fails every step turns readiness and liveness NOT_SERVING after
``unhealthy_after_failed_steps`` failures in a row.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gemma_mesh.audio.server import AudioServer
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.common.health import LIVENESS_SERVICE, FailedStepStreak
from gemma_mesh.decoder.server import DecoderServer, start_decoder
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.proto.v1 import (
    audio_pb2,
    audio_pb2_grpc,
    decoder_pb2,
    decoder_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)
from gemma_mesh.vision.server import VisionServer
from gemma_mesh.vision.settings import VisionSettings
from tests.grpc_helpers import LoopThread, ServerThread

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CPU = ["CPUExecutionProvider"]

# The graphs each service must have loaded and run before it reports SERVING.
GRAPHS = {
    "decoder": ["decoder_model_merged", "embed_tokens"],
    "audio": ["audio_conformer", "audio_subsample"],
    "vision": ["vision_encoder"],
}


class _CountingSession:
    """A real ONNX Runtime session that counts its runs (``run`` and ``run_with_iobinding``)."""

    def __init__(self, session: Any, runs: Counter, graph: str) -> None:
        self._session, self._runs, self._graph = session, runs, graph

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._runs[self._graph] += 1
        return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        self._runs[self._graph] += 1
        return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class GatedBundle(ModelBundle):
    """The embedded tiny bundle whose sessions are created only once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(None, providers=CPU)
        self.gate = threading.Event()
        self.runs: Counter = Counter()

    def session(self, graph: str) -> Any:
        if not self.gate.wait(timeout=120):
            raise TimeoutError("the test never opened the gate")
        return _CountingSession(super().session(graph), self.runs, graph)


async def _make_service(kind: str) -> Any:
    common = {"host": "127.0.0.1", "port": 0, "providers": CPU}
    if kind == "decoder":
        return DecoderServer(DecoderSettings(**common, max_batch_size=2))
    if kind == "audio":
        return AudioServer(AudioSettings(**common))
    return VisionServer(VisionSettings(**common))


def _call(kind: str, channel: grpc.Channel) -> None:
    """One real call of the service's API."""
    if kind == "decoder":
        message = decoder_pb2.Message(role="user", content=[decoder_pb2.ContentPart(text="hi")])
        request = decoder_pb2.GenerateRequest(request_id="r", messages=[message], max_tokens=2)
        list(decoder_pb2_grpc.DecoderStub(channel).Generate(request, timeout=30))
    elif kind == "audio":
        pcm = audio_pb2.PcmAudio(
            data=np.zeros(16000, "<f4").tobytes(), encoding=audio_pb2.F32LE, sample_rate_hz=16000, channels=1
        )
        audio_pb2_grpc.AudioFrontendStub(channel).Encode(audio_pb2.EncodeAudioRequest(pcm=pcm), timeout=30)
    else:
        png = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 80, 40)).save(png, format="PNG")
        request = vision_pb2.EncodeImageRequest(image=vision_pb2.ImageInput(encoded=png.getvalue()))
        vision_pb2_grpc.VisionEncoderStub(channel).Encode(request, timeout=30)


def _status(health: health_pb2_grpc.HealthStub, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health.Check(request, timeout=10, wait_for_ready=True).status


def _wait_status(health: health_pb2_grpc.HealthStub, service: str, want: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    status = _status(health, service)
    while status != want and time.monotonic() < deadline:
        time.sleep(0.05)
        status = _status(health, service)
    return status


def test_failed_step_streak_counts_failures_in_a_row() -> None:
    streak = FailedStepStreak(3)
    assert [streak.record(ok) for ok in (False, False, True, False, False)] == [False] * 5
    assert streak.count == 2 and not streak.broken
    assert streak.record(False) is True  # the third in a row: reported once
    assert streak.record(False) is False and streak.broken
    assert streak.record(True) is False and streak.broken  # a broken engine stays broken
    with pytest.raises(ValueError, match="threshold"):
        FailedStepStreak(0)


@pytest.mark.parametrize("kind", ["decoder", "audio", "vision"])
def test_not_ready_until_every_graph_is_loaded_and_warmed(kind: str) -> None:
    bundle = GatedBundle()
    with LoopThread() as loop:
        service = loop.run(_make_service(kind))
        starting = loop.submit(service.start(bundle))
        channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
        health = health_pb2_grpc.HealthStub(channel)
        try:
            # Loading: not ready on the server as a whole nor on the service; alive.
            assert _status(health, "") == NOT_SERVING
            assert _status(health, service.service_name) == NOT_SERVING
            assert _status(health, LIVENESS_SERVICE) == SERVING
            with pytest.raises(grpc.RpcError) as refused:
                _call(kind, channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in refused.value.details()
            assert bundle.loaded_graphs == [] and not starting.done()

            bundle.gate.set()
            starting.result(timeout=120)
            assert _status(health, "") == SERVING
            assert _status(health, service.service_name) == SERVING
            assert _status(health, LIVENESS_SERVICE) == SERVING
            # Every graph loaded and run once before SERVING, none waiting for the first request.
            assert bundle.loaded_graphs == GRAPHS[kind]
            assert {g: bundle.runs[g] >= 1 for g in GRAPHS[kind]} == dict.fromkeys(GRAPHS[kind], True)
            runs_before = sum(bundle.runs.values())
            _call(kind, channel)
            assert sum(bundle.runs.values()) > runs_before
            assert bundle.loaded_graphs == GRAPHS[kind]

            loop.run(service.health.draining())  # what SIGTERM does first
            assert _status(health, "") == NOT_SERVING
            assert _status(health, service.service_name) == NOT_SERVING
            assert _status(health, LIVENESS_SERVICE) == SERVING  # draining is no reason to restart
            loop.run(service.stop(0))
        finally:
            bundle.gate.set()
            channel.close()


def test_decoder_whose_session_fails_every_step_is_neither_ready_nor_live() -> None:
    bundle = ModelBundle(None, providers=CPU)
    settings = DecoderSettings(
        host="127.0.0.1", port=0, metrics_port=0, providers=CPU, unhealthy_after_failed_steps=2
    )
    with ServerThread(lambda: start_decoder(settings, bundle)) as decoder:
        channel = grpc.insecure_channel(f"127.0.0.1:{decoder.port}")
        health = health_pb2_grpc.HealthStub(channel)
        try:
            assert _status(health, "") == SERVING
            _call("decoder", channel)  # a working engine first
            # A real ONNX Runtime session that cannot run the decoder's inputs: every step raises.
            decoder.engine.session = bundle.session("vision_encoder")

            with pytest.raises(grpc.RpcError) as first:
                _call("decoder", channel)
            assert "decoder step failed" in first.value.details()
            # One failure is not a broken engine.
            assert _status(health, "") == SERVING
            assert _status(health, LIVENESS_SERVICE) == SERVING

            with pytest.raises(grpc.RpcError):
                _call("decoder", channel)
            assert _wait_status(health, "", NOT_SERVING) == NOT_SERVING
            assert _status(health, decoder.service_name) == NOT_SERVING
            assert _status(health, LIVENESS_SERVICE) == NOT_SERVING
            url = f"http://127.0.0.1:{decoder.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            assert "gemma_mesh_decoder_failed_steps_total 2.0" in text
        finally:
            channel.close()
