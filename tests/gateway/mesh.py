"""A real local mesh for gateway tests: the three gRPC services on loopback ports and gateways.

Backends run in-process (``ServerThread``: own event loop and thread, real gRPC over loopback) on
the tiny bundle; a gateway runs either in-process (``GatewayThread``, uvicorn) or as a separate
process (``GatewayProcess``, ``gemma-mesh serve gateway``) when a test kills it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from gemma_mesh.audio.server import AudioServer
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.decoder.server import start_decoder
from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.gateway.app import create_app
from gemma_mesh.gateway.server import uvicorn_options
from gemma_mesh.gateway.settings import GatewaySettings
from gemma_mesh.vision.server import VisionServer
from gemma_mesh.vision.settings import VisionSettings
from tests.grpc_helpers import ServerThread

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Backends:
    decoder: str
    audio: str
    vision: str
    decoder_server: object | None = None  # the in-process decoder (its engine's metrics), when started here

    def gateway_settings(self, **overrides) -> GatewaySettings:
        values = dict(
            host="127.0.0.1",
            port=0,
            decoder_target=self.decoder,
            audio_target=self.audio,
            vision_target=self.vision,
        )
        values.update(overrides)
        return GatewaySettings(**values)

    def env(self) -> dict[str, str]:
        return {
            "GEMMA_MESH_GATEWAY_DECODER_TARGET": self.decoder,
            "GEMMA_MESH_GATEWAY_AUDIO_TARGET": self.audio,
            "GEMMA_MESH_GATEWAY_VISION_TARGET": self.vision,
        }


class _Started:
    def __init__(self, server) -> None:
        self.server = server
        self.port = server.port

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)


def start_backends(bundle, stack) -> Backends:
    """Start decoder, audio and vision servers on free ports; ``stack`` (ExitStack) stops them."""

    async def audio():
        server = AudioServer(AudioSettings(host="127.0.0.1", port=0, encode_threads=2))
        await server.start(bundle)
        return _Started(server)

    async def vision():
        server = VisionServer(VisionSettings(host="127.0.0.1", port=0, batch_wait_ms=5.0))
        await server.start(bundle)
        return _Started(server)

    async def decoder():
        return await start_decoder(
            DecoderSettings(host="127.0.0.1", port=0, max_batch_size=16, providers=["CPUExecutionProvider"]),
            bundle,
        )

    started = [stack.enter_context(ServerThread(start)) for start in (decoder, audio, vision)]
    return Backends(*(f"127.0.0.1:{s.port}" for s in started), decoder_server=started[0])


class GatewayThread:
    """``with GatewayThread(settings) as url:`` a uvicorn gateway in a thread; ``url`` is ``http://host:port``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.port = settings.port or free_port()
        self.settings = settings.model_copy(update={"port": self.port})
        config = uvicorn.Config(
            create_app(self.settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            **uvicorn_options(self.settings),
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


class GatewayProcess:
    """``gemma-mesh serve gateway`` as a child process (for tests that kill it)."""

    def __init__(self, backends: Backends, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **backends.env(),
            **env,
            "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_mesh.cli", "serve", "gateway", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway process did not become healthy")

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye (a crashed pod)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
    """Poll ``predicate()`` (sync) until true. Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(interval_s)
