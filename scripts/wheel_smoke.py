"""Build the wheel, install it into an empty virtualenv and run the mesh from it, as a user would.

    python scripts/wheel_smoke.py [--keep DIR]

Steps, each bounded in time: ``python -m build`` (sdist, then the wheel from the sdist), a new
virtualenv with nothing in it, ``pip install`` of the wheel alone (its runtime dependencies only:
the step fails if torch, transformers or silero-vad arrive with it), ``gemma-mesh --version``,
``gemma-mesh make-tiny`` refused in one ``error:`` line naming the ``export`` extra,
``gemma-mesh up`` on a free port until ``/readyz`` answers 200, one transcription and one chat
completion through the official ``openai`` client, and a clean stop (SIGTERM, exit 0). The mesh
runs from a scratch directory with no ``PYTHONPATH``, so nothing of the source tree is imported.
pip's cache is used, so a second run downloads nothing.

``make test`` (and so CI) runs it before the test suite. The last line is one JSON object with
the steps' durations in seconds. Exit status 1 and ``error: ...`` on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import openai
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "services" / "gemma_mesh" / "sample_media" / "sense_and_sensibility_01_austen_64kb-0870.flac"
SPEECH_S = 113_600 / 16_000  # the clip's length: 113 600 samples at 16 kHz
BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 600
READY_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
SERVING_MUST_NOT_INSTALL = ("torch", "transformers", "silero_vad", "skimage")


class SmokeFailure(Exception):
    pass


def run(argv: list[str], *, timeout: float, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run ``argv``; its stdout, or SmokeFailure with the tail of its output."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SmokeFailure(f"{' '.join(argv[:3])} ... did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise SmokeFailure(f"{' '.join(argv[:3])} ... exited with status {proc.returncode}:\n{tail}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that would put the source tree or another
    virtualenv on the path of the installed package."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GEMMA_MESH_")}


def build_wheel(out: Path) -> Path:
    run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], timeout=BUILD_TIMEOUT_S)
    wheels = sorted(out.glob("gemma_mesh-*.whl"))
    if len(wheels) != 1 or not list(out.glob("gemma_mesh-*.tar.gz")):
        raise SmokeFailure(f"python -m build wrote {sorted(p.name for p in out.iterdir())}")
    return wheels[0]


def install(wheel: Path, venv: Path) -> Path:
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], timeout=INSTALL_TIMEOUT_S, env=clean_env())
    found = run(
        [
            str(python),
            "-c",
            "import importlib.util, sys; "
            f"print(' '.join(m for m in {SERVING_MUST_NOT_INSTALL!r} if importlib.util.find_spec(m)))",
        ],
        timeout=60,
        cwd=venv,
        env=clean_env(),
    ).strip()
    if found:
        raise SmokeFailure(f"installing the wheel brought {found}: serving must not depend on it")
    return venv / "bin" / "gemma-mesh"


def check_version(cli: Path, scratch: Path) -> str:
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    printed = run([str(cli), "--version"], timeout=60, cwd=scratch, env=clean_env()).strip()
    if printed != f"gemma-mesh {expected}":
        raise SmokeFailure(f"gemma-mesh --version printed {printed!r}, expected 'gemma-mesh {expected}'")
    return printed


def check_export_refused(cli: Path, scratch: Path) -> None:
    """Without the export extra, ``make-tiny`` is one ``error:`` line naming the extra, exit 2."""
    proc = subprocess.run(
        [str(cli), "make-tiny", "--out", str(scratch / "tiny")],
        cwd=scratch,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.splitlines()
    if proc.returncode != 2 or len(lines) != 1 or "gemma-mesh[export]" not in lines[0]:
        raise SmokeFailure(f"make-tiny without torch: exit {proc.returncode}, stderr {proc.stderr[-2000:]!r}")


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SmokeFailure(f"gemma-mesh up exited with status {proc.returncode} while starting")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SmokeFailure(f"gemma-mesh up was not ready in {READY_TIMEOUT_S} s")


def exercise(url: str) -> dict[str, object]:
    """One transcription and one chat completion with the official client; what came back."""
    client = OpenAI(base_url=f"{url}/v1", api_key="smoke", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    model = client.models.list().data[0].id
    with SPEECH.open("rb") as f:
        transcription = client.audio.transcriptions.create(
            model=model, file=f, response_format="verbose_json"
        )
    if abs(transcription.duration - SPEECH_S) > 0.05 or not transcription.segments:
        raise SmokeFailure(f"transcription of {SPEECH.name}: {transcription}")
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
    )
    choice = chat.choices[0]
    if not (1 <= chat.usage.completion_tokens <= 4) or choice.finish_reason not in ("stop", "length"):
        raise SmokeFailure(f"chat completion: {chat}")
    return {
        "model": model,
        "segments": len(transcription.segments),
        "chat_tokens": chat.usage.completion_tokens,
    }


def serve_and_exercise(cli: Path, scratch: Path) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = scratch / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(cli), "up", "--port", str(port)],
            cwd=scratch,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(url, proc)
            result = exercise(url)
        except BaseException:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SmokeFailure(f"gemma-mesh up did not stop within {STOP_TIMEOUT_S} s of SIGTERM") from None
    if status != 0:
        raise SmokeFailure(f"gemma-mesh up exited with status {status} on SIGTERM")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a removed temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="gemma-mesh-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        wheel = build_wheel(work / "dist")
        timings["build_s"] = time.monotonic() - started
        started = time.monotonic()
        cli = install(wheel, work / "venv")
        timings["install_s"] = time.monotonic() - started
        scratch = work / "scratch"
        scratch.mkdir(exist_ok=True)
        version = check_version(cli, scratch)
        check_export_refused(cli, scratch)
        started = time.monotonic()
        result = serve_and_exercise(cli, scratch)
        timings["up_and_requests_s"] = time.monotonic() - started
    except (SmokeFailure, openai.APIError) as failure:
        print(f"error: wheel smoke test: {failure}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wheel smoke test passed: {wheel.name}, {version}, {result}")
    print(json.dumps({"wheel": wheel.name, **result, **{k: round(v, 1) for k, v in timings.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
