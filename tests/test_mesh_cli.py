"""``gemma-mesh up`` + ``gemma-mesh stream`` end to end as a user runs them, the supervisor's restarts
and shutdown, and ``promtool check metrics`` on every service's /metrics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gemma_mesh.up import BACKENDS, Mesh, MeshConfig, free_port

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
CLI = [sys.executable, "-m", "gemma_mesh.cli"]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("mesh not ready")


def promtool_check(text: str) -> str:
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return text


@pytest.mark.slow
def test_up_then_stream_a_real_clip_and_a_photo(librivox_clips, tmp_path):
    from PIL import Image
    from skimage import data

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    port = free_port()
    up = subprocess.Popen(
        [*CLI, "up", "--port", str(port)], env=ENV, stderr=subprocess.PIPE, stdout=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, up)
        streamed = subprocess.run(
            [*CLI, "stream", str(librivox_clips[0]), "--image", str(photo), "--url", url, "--fps", "2"],
            env=ENV,
            capture_output=True,
            timeout=300,
        )
        out = streamed.stdout.decode()
        assert streamed.returncode == 0, streamed.stderr.decode()
        # Piped output: plain lines, one per final caption and per completed frame analysis.
        finals = [line for line in out.splitlines() if line.startswith("final ")]
        frames = [line for line in out.splitlines() if line.startswith("frame ")]
        assert finals and frames, out
        assert re.match(r"final  \[\d\d:\d\d\.\d\d-\d\d:\d\d\.\d\d\] #0 \S", finals[0]), finals[0]
        assert "\x1b[" not in out  # no terminal escapes when piped
        # Every service's /metrics passes promtool's lint; the gateway counted the audio.
        gateway_metrics = promtool_check(httpx.get(f"{url}/metrics").text)
        assert re.search(r"^gemma_mesh_gateway_audio_seconds_total [1-9]", gateway_metrics, re.M)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    printed = up.stderr.read().decode()
    metrics_urls = re.findall(r"(http://127\.0\.0\.1:\d+/metrics)", printed)
    assert len(metrics_urls) == 4, printed  # the gateway and the three backends
    # After SIGTERM nothing is left listening on the gateway port.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=1)


@pytest.mark.slow
def test_supervisor_restarts_a_crashed_service_and_stops_everything():
    async def scenario() -> None:
        async with Mesh(MeshConfig(port=free_port())) as mesh:
            for name in BACKENDS:
                text = httpx.get(mesh.urls()[f"{name}_metrics"], timeout=5).text
                promtool_check(text)
                assert f"gemma_mesh_{name}_" in text
                # services sharing a host run one ORT thread per operator unless the user said otherwise
                variable = f"GEMMA_MESH_{name.upper()}_INTRA_OP_THREADS"
                environ = Path(f"/proc/{mesh.children[name].proc.pid}/environ").read_bytes().split(b"\0")
                assert f"{variable}={os.environ.get(variable, '1')}".encode() in environ
            decoder = mesh.children["decoder"]
            old_pid = decoder.proc.pid
            decoder.proc.kill()
            deadline = time.monotonic() + 120
            while True:
                await asyncio.sleep(0.3)
                if decoder.restarts == 1 and decoder.proc.pid != old_pid:
                    async with httpx.AsyncClient() as client:
                        if (await client.get(f"{mesh.gateway_url}/readyz")).status_code == 200:
                            break
                assert time.monotonic() < deadline, "decoder was not restarted"
            procs = [c.proc for c in mesh.children.values()]
        assert all(p.returncode is not None for p in procs)

    asyncio.run(scenario())


def test_stream_reports_missing_files_and_bad_tasks_in_one_line(tmp_path, librivox_clips):
    missing = subprocess.run([*CLI, "stream", str(tmp_path / "nope.wav")], env=ENV, capture_output=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr.decode()
    bad = subprocess.run([*CLI, "stream", __file__, "--task", "sing"], env=ENV, capture_output=True)
    assert bad.returncode == 2 and "transcribe or translate" in bad.stderr.decode()
    refused = subprocess.run(
        [*CLI, "stream", str(librivox_clips[0]), "--url", f"http://127.0.0.1:{free_port()}"],
        env=ENV,
        capture_output=True,
    )
    assert refused.returncode == 2 and refused.stderr.decode().startswith("error: cannot connect to ws://")
    for bad in (["--fps", "0"], ["--fps", "-1"], ["--url", "ftp://x"]):
        rejected = subprocess.run(
            [*CLI, "stream", str(librivox_clips[0]), "--image", str(librivox_clips[0]), *bad],
            env=ENV,
            capture_output=True,
            timeout=60,
        )
        assert rejected.returncode == 2 and rejected.stderr.decode().startswith("error: "), bad
    not_audio = subprocess.run([*CLI, "stream", __file__], env=ENV, capture_output=True)
    assert not_audio.returncode == 2 and not_audio.stderr.decode().startswith("error: ")


def test_up_refuses_a_port_in_use():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*CLI, "up", "--port", str(port)], env=ENV, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "pick --port" in proc.stderr.decode(), proc.stderr.decode()
