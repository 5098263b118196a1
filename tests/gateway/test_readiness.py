"""``/readyz`` of a real gateway in front of real backends, with one dependency down at a time.

A backend that is down (nothing listens) or hangs (a socket that accepts and never speaks HTTP/2),
and a Redis that hangs, cost the capabilities that need them; the gateway stays ready while the
decoder serves, and answers within about one ``readiness_check_timeout_s`` however many checks hang.
"""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import pytest
from openai import OpenAI

from gemma_mesh.gateway.readiness import CAPABILITIES, capabilities
from tests.gateway.mesh import Backends, GatewayThread, free_port

ALL = sorted(CAPABILITIES)


@pytest.fixture(scope="module")
def live_backends(embedded_backends: Backends) -> Backends:
    return embedded_backends


@contextlib.contextmanager
def black_hole():
    """``host:port`` of a listening socket that never accepts: connections open, nothing answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


def test_capabilities_need_every_dependency() -> None:
    up = {"decoder": True, "audio": True, "vision": False, "store": True}
    assert capabilities(up) == {
        "chat": True,
        "chat_images": False,
        "transcriptions": True,
        "live_captions": True,
        "live_frames": False,
    }
    assert not any(capabilities({"audio": True, "vision": True, "store": True}).values())


def test_all_up_is_ready_with_nothing_degraded(live_backends: Backends) -> None:
    with GatewayThread(live_backends.gateway_settings()) as url:
        reply = _readyz(url)
        assert reply.status_code == 200
        body = reply.json()
        assert body["ready"] is True and body["degraded"] == []
        assert body["backends"] == {"decoder": True, "audio": True, "vision": True}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'gemma_mesh_gateway_capability_up{capability="live_frames"} 1.0' in metrics


def test_vision_down_costs_images_and_frames_only(live_backends: Backends) -> None:
    settings = live_backends.gateway_settings(vision_target=f"127.0.0.1:{free_port()}")
    with GatewayThread(settings) as url:
        reply = _readyz(url)
        assert reply.status_code == 200
        body = reply.json()
        assert body["ready"] is True
        assert body["degraded"] == ["chat_images", "live_frames"]
        assert body["backends"] == {"decoder": True, "audio": True, "vision": False}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'gemma_mesh_gateway_capability_up{capability="live_frames"} 0.0' in metrics
        assert 'gemma_mesh_gateway_capability_up{capability="transcriptions"} 1.0' in metrics
        # Text chat still works through this gateway.
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
        completion = client.chat.completions.create(
            model="gemma-4-e4b-it", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage.completion_tokens >= 1


def test_decoder_down_is_not_ready(live_backends: Backends) -> None:
    settings = live_backends.gateway_settings(decoder_target=f"127.0.0.1:{free_port()}")
    with GatewayThread(settings) as url:
        reply = _readyz(url)
        assert reply.status_code == 503
        body = reply.json()
        assert body["ready"] is False and body["degraded"] == ALL
        assert body["backends"] == {"decoder": False, "audio": True, "vision": True}


def test_hanging_checks_run_at_once_within_the_timeout(live_backends: Backends) -> None:
    timeout_s = 1.5
    with black_hole() as audio, black_hole() as vision, black_hole() as redis:
        settings = live_backends.gateway_settings(
            audio_target=audio,
            vision_target=vision,
            redis_url=f"redis://{redis}/0",
            redis_key_prefix="gemma-mesh-test-readiness",
            readiness_check_timeout_s=timeout_s,
        )
        with GatewayThread(settings) as url:
            started = time.monotonic()
            reply = _readyz(url)
            elapsed = time.monotonic() - started
    assert reply.status_code == 200
    body = reply.json()
    assert body["degraded"] == ["chat_images", "live_captions", "live_frames", "transcriptions"]
    assert body["store"] == {"ok": False, "latency_s": None}
    # Three checks hang for the whole timeout: one after another they would take three of them.
    assert timeout_s * 0.9 <= elapsed < 2 * timeout_s
