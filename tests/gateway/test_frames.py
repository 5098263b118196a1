"""Frame analysis policy: captions first. While captions miss their latency objective, frames wait
(the newest replaces the waiting one, counted as dropped; the session is warned once); when
captions catch up, the newest frame is analysed."""

from __future__ import annotations

import asyncio
import io
import itertools

import numpy as np
import pytest
from PIL import Image

from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.live.frames import FramePipeline
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.protocol import FrameAnalysis, VideoConfig
from gemma_mesh.gateway.protocol import Warning as WarningEvent


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def pipeline(
    clients, emit, *, max_tokens=4, metrics=None, captions_behind=None, slots=None, **video
) -> FramePipeline:
    """A started ``FramePipeline`` analysing every 200 ms (``video`` overrides ``VideoConfig`` fields)."""
    frames = FramePipeline(
        clients=clients,
        video=VideoConfig(**{"max_fps": 5, "analysis_interval_ms": 200, **video}),
        emit=emit,
        metrics=metrics if metrics is not None else GatewayMetrics(),
        default_interval_ms=200,
        max_tokens=max_tokens,
        captions_behind=captions_behind,
        slots=slots,
    )
    frames.start()
    return frames


@pytest.mark.asyncio
async def test_frames_wait_while_captions_are_behind(backends):
    behind = True
    events: list[FrameAnalysis] = []

    async def emit(event) -> None:
        events.append(event)

    clients = MeshClient(backends.decoder, backends.audio, backends.vision)
    frames = pipeline(clients, emit, captions_behind=lambda: behind)
    try:
        await asyncio.sleep(0.25)  # the first interval passes with nothing to analyse
        for i in range(3):
            assert frames.push(jpeg(i), timestamp_ms=1000 + 250 * i)
            await asyncio.sleep(0.3)
        # each newer frame replaced the waiting one; one warning for the whole wait
        assert frames.dropped == 2
        assert [(type(e), e.code) for e in events] == [(WarningEvent, "frames_deferred")]
        behind = False
        async with asyncio.timeout(30):
            while not any(isinstance(e, FrameAnalysis) and e.done for e in events):
                await asyncio.sleep(0.05)
        done = [e for e in events if isinstance(e, FrameAnalysis) and e.done]
        assert [e.frame_ms for e in done] == [1500]  # the newest frame
        behind = True  # behind again after an analysis ran: warned again
        frames.push(jpeg(9), timestamp_ms=3000)
        async with asyncio.timeout(5):
            while sum(isinstance(e, WarningEvent) for e in events) < 2:
                await asyncio.sleep(0.05)
    finally:
        frames.cancel()
        await clients.close()


@pytest.mark.asyncio
async def test_an_analysis_that_loops_is_ended_there(backends):
    """The tiny random model's answers degenerate into loops (``cricricri...``): an analysis ends at
    the first streamed delta whose text ends in a loop instead of running to ``max_tokens``."""
    from skimage import data

    from gemma_mesh.gateway.captioning import RepetitionGuard

    guard = RepetitionGuard()
    clients = MeshClient(backends.decoder, backends.audio, backends.vision)
    results = []
    try:
        for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
            events: list[FrameAnalysis] = []

            async def emit(event, sink=events) -> None:
                sink.append(event)

            metrics = GatewayMetrics()
            frames = pipeline(clients, emit, max_tokens=64, metrics=metrics)
            image = Image.fromarray(getattr(data, name)())
            image.thumbnail((256, 256))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG")
            frames.push(buffer.getvalue(), timestamp_ms=1000 * i)
            await frames.finish()
            done = [e for e in events if e.done]
            assert len(done) == 1
            tokens = metrics.tokens_generated._value.get()
            deltas = [e for e in events if not e.done]
            # no delta but the last shows a loop: the analysis ended at the first one that did
            assert not any(guard.ends_in_loop(e.text, e.delta) for e in deltas[:-1]), done[0].text
            results.append((done[0].text, tokens, guard.ends_in_loop(deltas[-1].text)))
    finally:
        await clients.close()
    for text, tokens, looped in results:
        assert tokens <= 64 and (looped or tokens == 64), (text, tokens)  # only a loop stops it early
    assert any(tokens < 64 for _, tokens, _ in results), results


@pytest.mark.asyncio
async def test_a_budget_the_encoder_refuses_is_reported_against_the_session_config(backends):
    """A session whose budget the gateway could not check at start (vision encoder unreachable
    then) gets one error per frame naming ``video.max_soft_tokens``, and the pipeline goes on."""
    events: list = []

    async def emit(event) -> None:
        events.append(event)

    clients = MeshClient(backends.decoder, backends.audio, backends.vision)
    frames = pipeline(clients, emit, max_soft_tokens=71)
    try:
        frames.push(jpeg(0), timestamp_ms=500)
        await frames.finish()
    finally:
        await clients.close()
    assert [(e.type, e.param) for e in events] == [("error", "video.max_soft_tokens")]
    assert "frame at 500 ms" in events[0].message and "max_soft_tokens" in events[0].message


@pytest.mark.asyncio
async def test_sessions_share_the_gateways_analysis_slots():
    """Two sessions, one slot (max_concurrent_analyses=1): their analyses never overlap, and a
    session whose turn finds the slot busy analyses its newest frame at a later turn. The analysis
    itself is a stand-in (this is the scheduling, not the mesh)."""
    slots = asyncio.Semaphore(1)
    running, most, analysed = 0, 0, {}

    async def emit(event) -> None: ...

    pipelines = [pipeline(None, emit, slots=slots) for _ in range(2)]
    for index, frames in enumerate(pipelines):

        async def analyse(frame, timestamp_ms, index=index) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.35)  # longer than the 200 ms interval: the other turn finds it busy
            running -= 1
            analysed.setdefault(index, []).append(timestamp_ms)

        frames._analyse = analyse
    try:
        for step in range(8):
            for frames in pipelines:
                frames.push(jpeg(step), timestamp_ms=1000 + 250 * step)
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.8)
    finally:
        for frames in pipelines:
            frames.cancel()
    assert most == 1
    assert set(analysed) == {0, 1}  # both sessions got analyses
    assert all(b > a for times in analysed.values() for a, b in itertools.pairwise(times))
