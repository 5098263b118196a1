"""``gemma-mesh up``: the whole mesh on one machine, as supervised child processes.

Starts the decoder, audio frontend, vision encoder (each ``gemma-mesh serve ...`` on a free
loopback gRPC port, Prometheus on another) and the gateway (``--port``, default 8000), waits until
each reports healthy (``grpc.health.v1`` SERVING; the gateway's ``/readyz``), restarts a child
that dies with exponential backoff (1 s doubling to 30 s, reset after 60 s of uptime), and on
SIGINT/SIGTERM stops the gateway first (it drains its live sessions for ``drain_grace_s``: finals
delivered, then 1012), then the backends (SIGTERM, then SIGKILL after the grace).
This is a laptop convenience; in Kubernetes each component is a Deployment (helm/gemma-mesh).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gemma_mesh.common.errors import MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.net import check_port_free

log = get_logger("up")

BACKENDS = ("decoder", "audio", "vision")
# The services of one host share its cores: one ONNX Runtime thread per operator each (a second
# thread per service only oversubscribes them; on 2 cores at 32 live sessions it lowered p95
# partial latency). A value set in the environment (or MeshConfig.extra_env) wins.
SHARED_HOST_ENV = {f"GEMMA_MESH_{name.upper()}_INTRA_OP_THREADS": "1" for name in BACKENDS}
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """One supervised service: its command line, ports and restart bookkeeping."""

    name: str
    argv: list[str]
    port: int
    metrics_port: int | None = None
    proc: asyncio.subprocess.Process | None = None
    env: dict[str, str] = field(default_factory=dict)  # this child's own variables, over the environment
    stop_grace_s: float = STOP_GRACE_S  # SIGTERM to SIGKILL
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class MeshConfig:
    """What ``up`` runs: the bundle (None = embedded tiny), Redis (None = in-process), gateway address."""

    bundle: Path | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "WARNING"
    ready_timeout_s: float = 180.0
    # The gateway's drain on stop: live sessions get this long to deliver their finals (then 1012).
    drain_grace_s: float = 10.0
    extra_env: dict[str, str] = field(default_factory=dict)


class Mesh:
    """The supervisor. ``async with Mesh(config) as mesh:`` starts everything and waits until ready.

    Raises (on enter):
        MeshError: a child exits before becoming healthy, or ``ready_timeout_s`` passes.
    """

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: dict[str, Child] = {}
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        py = [sys.executable, "-m", "gemma_mesh.cli", "--log-level", config.log_level, "serve"]
        bundle = ["--bundle", str(config.bundle)] if config.bundle else []
        for name in BACKENDS:
            port, metrics_port = free_port(), free_port()
            argv = [*py, name, *bundle, "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--metrics-port", str(metrics_port)]
            self.children[name] = Child(name, argv, port, metrics_port)
        gateway = [*py, "gateway", "--host", config.host, "--port", str(config.port)]
        for name in BACKENDS:
            gateway += [f"--{name}", self.children[name].target]
        if config.redis_url:
            gateway += ["--redis-url", config.redis_url]
        self.children["gateway"] = Child(
            "gateway",
            gateway,
            config.port,
            env={"GEMMA_MESH_GATEWAY_DRAIN_GRACE_S": str(config.drain_grace_s)},
            stop_grace_s=config.drain_grace_s + STOP_GRACE_S,
        )

    @property
    def gateway_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.port}"

    def urls(self) -> dict[str, str]:
        """Everything a user may open: the page, the API, the WebSocket, each /metrics."""
        urls = {
            "page": f"{self.gateway_url}/",
            "openai_api": f"{self.gateway_url}/v1",
            "stream": self.gateway_url.replace("http", "ws", 1) + "/v1/stream",
            "gateway_metrics": f"{self.gateway_url}/metrics",
        }
        for name in BACKENDS:
            child = self.children[name]
            urls[f"{name}_grpc"] = child.target
            urls[f"{name}_metrics"] = f"http://127.0.0.1:{child.metrics_port}/metrics"
        return urls

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every child and wait until all are healthy.

        Raises:
            InvalidRequest: the gateway's port is taken (another process would answer its probes).
            MeshError: a child exits while starting, or does not become healthy in time.
        """
        check_port_free(self.config.host, self.config.port, what="the gateway (--port)")
        for child in self.children.values():
            await self._spawn(child)
        deadline = time.monotonic() + self.config.ready_timeout_s
        try:
            for name in BACKENDS:
                await self._wait_grpc(self.children[name], deadline)
            await self._wait_http(self.children["gateway"], deadline)
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise())
        log.info("mesh ready", **self.urls())

    async def _spawn(self, child: Child) -> None:
        env = {**SHARED_HOST_ENV, **os.environ, **child.env, **self.config.extra_env}
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv, env=env, stdin=asyncio.subprocess.DEVNULL
        )
        child.started_at = time.monotonic()
        log.info("started", service=child.name, pid=child.proc.pid, port=child.port)

    async def _wait_grpc(self, child: Child, deadline: float) -> None:
        async with grpc.aio.insecure_channel(child.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(child)
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        log.info("healthy", service=child.name)
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise MeshError(
                        f"{child.name} did not become healthy in {self.config.ready_timeout_s:.0f} s"
                    )
                await asyncio.sleep(0.2)

    async def _wait_http(self, child: Child, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                self._check_alive(child)
                try:
                    if (await client.get(f"{self.gateway_url}/readyz")).status_code == 200:
                        log.info("healthy", service=child.name)
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise MeshError(f"gateway did not become ready in {self.config.ready_timeout_s:.0f} s")
                await asyncio.sleep(0.2)

    @staticmethod
    def _check_alive(child: Child) -> None:
        if child.proc is not None and child.proc.returncode is not None:
            raise MeshError(f"{child.name} exited with status {child.proc.returncode} while starting")

    async def _supervise(self) -> None:
        """Restart children that exit, with backoff; runs until ``stop``."""
        while not self._stopping:
            waits = {asyncio.create_task(c.proc.wait()): c for c in self.children.values() if c.proc}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if self._stopping:
                return
            for task in done:
                child = waits[task]
                uptime = time.monotonic() - child.started_at
                if uptime > STABLE_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                log.warning(
                    "service exited; restarting",
                    service=child.name,
                    status=child.proc.returncode,
                    uptime_s=round(uptime, 1),
                    backoff_s=child.backoff_s,
                )
                await asyncio.sleep(child.backoff_s)
                child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
                if self._stopping:
                    return
                child.restarts += 1
                await self._spawn(child)

    async def stop(self) -> None:
        """Stop the gateway, then the backends: SIGTERM, SIGKILL after each child's ``stop_grace_s``
        (the gateway's covers its session drain, ``drain_grace_s``)."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        # The gateway first, and alone: its sessions' last decodes (finals of open segments, stored
        # for resume) still need the backends; then the backends together.
        for group in (["gateway"], list(BACKENDS)):
            children = [self.children[name] for name in group]
            for child in children:
                if child.proc is not None and child.proc.returncode is None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in children:
                if child.proc is None:
                    continue
                try:
                    await asyncio.wait_for(child.proc.wait(), timeout=child.stop_grace_s)
                except TimeoutError:
                    child.proc.kill()
                    await child.proc.wait()
        log.info("mesh stopped")

    async def wait_for_signal(self) -> None:
        """Block until SIGINT or SIGTERM."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
