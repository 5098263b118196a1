"""SIGTERM to a real gateway process (``gemma-mesh serve gateway``) with live sessions: each open
segment's final is delivered, then the socket closes with 1012, all within ``drain_grace_s``; the
listener is closed at once (a draining replica takes no new session) and the process ends
cleanly. ``gemma-mesh up`` (``Mesh.stop``) gives its gateway the same drain before the backends stop."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import numpy as np
import pytest
import websockets

from gemma_mesh.model.audio_io import decode_audio
from gemma_mesh.up import Mesh, MeshConfig
from tests.gateway.mesh import Backends, GatewayProcess, free_port
from tests.gateway.test_resume import RATE, Client

pytestmark = pytest.mark.asyncio(loop_scope="module")
DRAIN_GRACE_S = 12.0


@pytest.fixture(scope="module")
def clip(librivox_clips) -> np.ndarray:
    """One LibriVox clip, no trailing silence: its segment is still open when the audio stops."""
    return decode_audio(librivox_clips[0], RATE)


async def _events_until_closed(client: Client, timeout_s: float) -> tuple[list[dict], int | None]:
    events = []
    async with asyncio.timeout(timeout_s):
        try:
            while True:
                events.append(json.loads(await client.ws.recv()))
        except websockets.ConnectionClosed as closed:
            return events, closed.rcvd.code if closed.rcvd is not None else None


async def test_sigterm_delivers_finals_then_closes_1012(embedded_backends: Backends, clip: np.ndarray):
    gateway = GatewayProcess(embedded_backends, GEMMA_MESH_GATEWAY_DRAIN_GRACE_S=str(DRAIN_GRACE_S))
    gateway.start()
    try:
        clients = [Client(gateway.url) for _ in range(2)]
        for client in clients:
            started = await client.connect()
            assert started["type"] == "session.started"
        clip_ms = len(clip) * 1000 // RATE
        await asyncio.gather(*(c.send_audio(clip, 0, clip_ms, speed=4.0) for c in clients))
        # Each session has an open segment (a partial, no final yet) when the gateway is told to stop.
        opened = [await c.until(lambda e: e["type"] == "caption.partial") for c in clients]
        open_segments = [got[-1]["segment_id"] for got in opened]
        assert not any(e["type"] == "caption.final" for c in clients for e in c.events)

        stopping = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*(_events_until_closed(c, DRAIN_GRACE_S + 5) for c in clients))
        closed_after = time.monotonic() - stopping

        for (events, code), segment_id in zip(results, open_segments, strict=True):
            assert code == 1012
            finals = [e for e in events if e["type"] == "caption.final"]
            assert [f["segment_id"] for f in finals][-1:] == [segment_id], events
            assert finals[-1]["reason"] == "end"
            assert finals[-1]["end_ms"] > 0
        assert closed_after < DRAIN_GRACE_S

        # The listener closed at SIGTERM: no new session lands on a draining replica.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gateway.url}/readyz", timeout=2)
        # uvicorn re-raises the SIGTERM it handled once it has shut down: killed by that signal
        # after a clean shutdown, never by the SIGKILL of an exceeded grace.
        code = await asyncio.to_thread(gateway.proc.wait, DRAIN_GRACE_S + 10)
        assert code in (0, -signal.SIGTERM)
    finally:
        gateway.stop()


async def test_up_stops_the_gateway_after_its_sessions_drained(clip: np.ndarray):
    async with Mesh(MeshConfig(port=free_port(), drain_grace_s=DRAIN_GRACE_S)) as mesh:
        client = Client(mesh.gateway_url)
        await client.connect()
        await client.send_audio(clip, 0, len(clip) * 1000 // RATE, speed=4.0)
        segment_id = (await client.until(lambda e: e["type"] == "caption.partial"))[-1]["segment_id"]
        stopping = asyncio.create_task(mesh.stop())
        events, code = await _events_until_closed(client, DRAIN_GRACE_S + 5)
        await asyncio.wait_for(stopping, DRAIN_GRACE_S + 30)
        gateway = mesh.children["gateway"].proc
    assert code == 1012
    assert [e["segment_id"] for e in events if e["type"] == "caption.final"][-1:] == [segment_id]
    assert gateway.returncode in (0, -signal.SIGTERM)  # not the SIGKILL of an exceeded grace
