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


def wait_ready(url: str, proc: subprocess.Popen, log: Path | None = None, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (log.read_bytes() if log else proc.stderr.read()).decode()[-3000:]
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


def _time_wait_on(port: int) -> bool:
    """Whether a TCP socket with local port ``port`` is in TIME_WAIT (state 06 in /proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                return True
    return False


def test_port_check_ignores_time_wait_but_not_a_listener():
    import socket

    from gemma_mesh.common.errors import InvalidRequest
    from gemma_mesh.common.net import check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(InvalidRequest, match="Address already in use; pick another port"):
            check_port_free("127.0.0.1", port, what="the gateway")
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        served, _ = listener.accept()
        served.close()  # the server side closes first: its end (the listening port) waits in TIME_WAIT
        client.recv(1)
        client.close()
    assert _time_wait_on(port)
    # A stopped server's TIME_WAIT does not hold the port.
    check_port_free("127.0.0.1", port, what="the gateway")


@pytest.mark.slow
def test_up_restarts_at_once_on_the_port_it_just_left(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for run in range(2):
        log = tmp_path / f"up{run}.log"  # a file, not a pipe: nobody reads it while `up` runs
        with log.open("wb") as sink:
            up = subprocess.Popen([*CLI, "up", "--port", str(port)], env=ENV, stderr=sink, stdout=sink)
        try:
            wait_ready(url, up, log)
            deadline = time.monotonic() + 30  # `up` handles SIGTERM once it has printed its banner
            while b"mesh is up" not in log.read_bytes():
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            # A kept-alive connection that the gateway closes when it stops: its end of it stays in
            # TIME_WAIT on the gateway port, which used to keep the next `up` out for a minute.
            with httpx.Client(timeout=5) as client:
                assert client.get(f"{url}/healthz").status_code == 200
                up.send_signal(signal.SIGTERM)
                assert up.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if up.poll() is None:
                up.kill()
                up.wait(timeout=30)
        if run == 0:
            assert _time_wait_on(port)
