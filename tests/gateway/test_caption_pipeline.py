"""CaptionPipeline's ordering when a segment closes while its partial decodes.

The pipeline's own logic (a real Silero VAD on a real LibriVox clip); the mesh is a stand-in that
holds every decode until the test releases it, so the close provably happens mid-decode.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from gemma_mesh.gateway.captioning import VadSettings
from gemma_mesh.gateway.live.captions import RATE_HZ, CaptionPipeline
from gemma_mesh.gateway.mesh_types import Answer
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.protocol import CaptionFinal, CaptionPartial, SessionConfig
from gemma_mesh.model.audio_io import decode_audio


class _BrokenStream:
    """An incremental encoding that failed: partials fall back to ``encode_audio``."""

    failed = True

    def send(self, audio) -> None: ...

    def cancel(self) -> None: ...


class HeldMesh:
    """Decodes wait for ``release``; each answers ``"hello world"``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0

    def encode_stream(self, rate_hz: int, *, provisional_tail: bool = False) -> _BrokenStream:
        return _BrokenStream()

    async def encode_audio(self, *, pcm_f32: np.ndarray, sample_rate_hz: int):
        return [SimpleNamespace(soft_tokens=None)], pcm_f32.shape[0] / sample_rate_hz

    async def stream_answer(self, messages, sampling, *, until=None, on_delta=None) -> Answer:
        self.in_flight += 1
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return Answer("hello world", [7, 8], 2)


async def _until(condition, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_partial_in_flight_when_its_segment_closes_is_sent_before_the_final(librivox_clips):
    mesh = HeldMesh()
    events: list = []

    async def emit(event) -> None:
        events.append(event)

    captions = CaptionPipeline(
        clients=mesh,
        config=SessionConfig(),
        emit=emit,
        metrics=GatewayMetrics(),
        vad_settings=VadSettings(),
        partial_interval_ms=100,
        max_tokens=16,
        max_pending_audio_s=20.0,
    )
    captions.start()
    speech = decode_audio(librivox_clips[0], RATE_HZ)[: 2 * RATE_HZ]
    for begin in range(0, speech.shape[0], 1600):
        await captions.push(speech[begin : begin + 1600])
    await _until(lambda: mesh.in_flight == 1)  # a partial of segment 0 is decoding, held
    for _ in range(15):  # 1.5 s of silence: the VAD closes segment 0 meanwhile
        await captions.push(np.zeros(1600, np.float32))
    await _until(lambda: bool(captions._finals))
    assert mesh.in_flight == 1 and events == []
    mesh.release.set()
    await captions.finish()

    kinds = [type(e) for e in events]
    assert kinds.count(CaptionFinal) == 1
    final = next(e for e in events if isinstance(e, CaptionFinal))
    partials = [e for e in events if isinstance(e, CaptionPartial)]
    assert partials, "the held partial was dropped"
    assert kinds.index(CaptionPartial) < kinds.index(CaptionFinal)  # in order: partial, then final
    assert all(p.segment_id == final.segment_id == 0 for p in partials)
    assert partials[0].end_ms <= final.end_ms  # clipped to the segment it belongs to
    assert partials[0].text == "hello world"
