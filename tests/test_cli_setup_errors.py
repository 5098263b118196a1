"""A user's broken setup through the real command line: one ``error:`` line, no traceback, exit 2.

Each case runs ``gemma-mesh`` in a subprocess as a user would: a VAD model path that names no
file, a bundle that does not exist or lacks a graph file, the gateway's port taken, and a Redis
that does not answer. Nothing of the mesh may be left running afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_mesh.model.bundle import embedded_bundle_path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
CLI = [sys.executable, "-m", "gemma_mesh.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, nothing on stdout, and stderr is exactly one ``error: ...`` line naming ``fragments``."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"gemma-mesh {version('gemma-mesh')}\n", proc


@pytest.mark.parametrize("command", ["up", "demo"])
def test_missing_vad_model(command, tmp_path):
    missing = tmp_path / "silero_vad.onnx"
    proc = run_cli(
        command,
        "--port",
        str(free_port()),
        env={"GEMMA_MESH_GATEWAY_VAD_MODEL_PATH": str(missing)},
    )
    assert_one_error_line(proc, str(missing), "GEMMA_MESH_GATEWAY_VAD_MODEL_PATH")


def test_serve_gateway_with_a_missing_vad_model(tmp_path):
    missing = tmp_path / "silero_vad.onnx"
    proc = run_cli(
        "serve",
        "gateway",
        "--port",
        str(free_port()),
        env={"GEMMA_MESH_GATEWAY_VAD_MODEL_PATH": str(missing)},
    )
    assert_one_error_line(proc, str(missing))


def test_missing_bundle(tmp_path):
    proc = run_cli("up", "--bundle", str(tmp_path / "no-bundle"), "--port", str(free_port()))
    assert_one_error_line(proc, str(tmp_path / "no-bundle"), "gemma-mesh export")


def test_bundle_lacking_a_graph_file(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(embedded_bundle_path(), bundle)
    graph = json.loads((bundle / "manifest.json").read_text())["graphs"]["vision_encoder"]["file"]
    (bundle / graph).unlink()
    proc = run_cli("up", "--bundle", str(bundle), "--port", str(free_port()))
    assert_one_error_line(proc, graph, "re-export")


def test_port_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("up", "--port", str(port))
    assert_one_error_line(proc, f"127.0.0.1:{port}", "--port")


def test_redis_unreachable():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proc = run_cli("up", "--redis-url", url, "--port", str(free_port()))
    assert_one_error_line(proc, url, "unreachable")


@pytest.mark.parametrize(
    ("service", "reuseport", "names"),
    [("audio", False, "AudioFrontend"), ("audio", True, "AudioFrontend"), ("gateway", False, "the gateway")],
)
def test_service_on_a_taken_port(service, reuseport, names):
    """A port already listened on is a one-line error, also when its owner set SO_REUSEPORT (as
    every gRPC server does by default, which would let a second service share the port)."""
    with socket.socket() as holder:
        if reuseport:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_cli("serve", service, "--host", "127.0.0.1", "--port", str(port))
    assert_one_error_line(proc, f"cannot listen on 127.0.0.1:{port}", names)


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_up_with_a_port_out_of_range(port):
    proc = run_cli("up", "--port", port)
    assert_one_error_line(proc, f"port {port} for the gateway (--port) is not in 0-65535")
