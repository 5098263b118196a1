"""deploy/Dockerfile read as a build plan (no Docker engine runs in CI), and its two helper scripts
run for real: the requirement lists and the container health check."""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.deploy_helpers import DEPLOY, REPO


def _load_script(name: str) -> ModuleType:
    """deploy/<name>.py as a module (the scripts are copied into the images, not packaged)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load_script("healthcheck")
requirements = _load_script("requirements")

SERVING_TARGETS = ("decoder", "audio", "vision", "gateway", "decoder-cuda", "audio-cuda", "vision-cuda")
ALL_TARGETS = (*SERVING_TARGETS, "exporter")


@dataclass
class Stage:
    name: str
    base: str
    lines: list[str] = field(default_factory=list)

    def instructions(self, keyword: str) -> list[str]:
        return [line[len(keyword) + 1 :] for line in self.lines if line.startswith(keyword + " ")]


def parse_dockerfile(path: Path = DEPLOY / "Dockerfile") -> dict[str, Stage]:
    """Stages by name, each with its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"FROM (\S+) AS (\S+)", line)
        if match:
            current = stages[match[2]] = Stage(match[2], match[1])
        elif current is not None:
            current.lines.append(line)
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile()


def test_every_target_exists(stages: dict[str, Stage]) -> None:
    assert set(ALL_TARGETS) <= set(stages)
    assert stages["builder"].base == "${PYTHON_IMAGE}"
    assert chain(stages, "decoder")[-1].base == "${PYTHON_IMAGE}"
    assert chain(stages, "decoder-cuda")[-1].base == "${CUDA_IMAGE}"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "cudnn-runtime" in args["CUDA_IMAGE"]


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_targets_run_as_uid_10001(stages: dict[str, Stage], target: str) -> None:
    users = [u for stage in chain(stages, target) for u in reversed(stage.instructions("USER"))]
    assert users and users[0] == "10001:10001", f"{target} ends as user {users[:1]}"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_targets_have_no_torch_and_check_their_health(stages: dict[str, Stage], target: str) -> None:
    plan = " ".join(line for stage in chain(stages, target) for line in stage.lines)
    assert "[export]" not in plan and not re.search(r"pip install[^&]*\btorch\b", plan), target
    assert "find_spec('torch') is None" in plan, f"{target} does not assert that torch is absent"
    (entrypoint,) = stages[target].instructions("ENTRYPOINT")
    service = target.removesuffix("-cuda")
    assert entrypoint == f'["gemma-mesh", "serve", "{service}"]'
    (check,) = stages[target].instructions("HEALTHCHECK")
    kind = "http" if service == "gateway" else "grpc"
    assert f'CMD ["gemma-mesh-healthcheck", "{kind}"' in check


def test_cuda_targets_get_onnxruntime_gpu_only(stages: dict[str, Stage]) -> None:
    cuda = " ".join(stages["runtime-cuda"].lines)
    cpu = " ".join(stages["runtime-cpu"].lines)
    assert "requirements-cuda.txt" in cuda and "requirements-cpu.txt" not in cuda
    assert "requirements-cpu.txt" in cpu
    for runtime in (cuda, cpu):
        assert "pip install --no-deps /wheels/gemma_mesh-" in runtime
    for target in ("decoder-cuda", "audio-cuda", "vision-cuda"):
        assert chain(stages, target)[1].name == "runtime-cuda"
        env = " ".join(stages[target].instructions("ENV"))
        assert '["CUDAExecutionProvider","CPUExecutionProvider"]' in env


def test_gateway_takes_its_vad_model_from_the_wheel(stages: dict[str, Stage]) -> None:
    """The VAD model ships in the gemma-mesh wheel: the gateway image installs nothing more (the
    silero-vad package would bring torch)."""
    assert stages["gateway"].base == "runtime-cpu"
    assert not stages["gateway"].instructions("RUN")
    for stage in chain(stages, "gateway"):
        assert "silero-vad" not in " ".join(stage.lines), stage.name


def test_exporter_installs_the_export_extra(stages: dict[str, Stage]) -> None:
    plan = " ".join(stages["exporter"].lines)
    assert '[export]"' in plan and "gemma-mesh" in stages["exporter"].instructions("ENTRYPOINT")[0]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_keeps_what_the_dockerfile_copies(stages: dict[str, Stage]) -> None:
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for stage in stages.values()
        for copy in stage.instructions("COPY")
        if "--from" not in copy
        for src in [w for w in copy.split() if not w.startswith("--")][:-1]
    ]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), src
        assert not _ignored(src.rstrip("/"), patterns), f"{src} is excluded from the build context"
    for needed in ("services/gemma_mesh/model/embedded/tiny/manifest.json", "services/gemma_mesh/cli.py"):
        assert not _ignored(needed, patterns), needed
    for unwanted in ("tests/conftest.py", ".venv/bin/python", "runs/bench/x", ".git/HEAD"):
        assert _ignored(unwanted, patterns), unwanted


# --- deploy/requirements.py ---------------------------------------------------------------------


def test_requirement_lists_from_pyproject(tmp_path: Path) -> None:
    requirements.main([str(REPO / "pyproject.toml"), str(tmp_path), "--onnxruntime-gpu", ">=1.22"])
    cpu = (tmp_path / "requirements-cpu.txt").read_text().splitlines()
    cuda = (tmp_path / "requirements-cuda.txt").read_text().splitlines()
    assert any(re.match(r"onnxruntime\b(?!-)", r) for r in cpu)
    assert "onnxruntime-gpu>=1.22" in cuda
    assert not any(re.match(r"onnxruntime(?!-gpu)\b", r) for r in cuda)
    assert len(cpu) == len(cuda) and not any("torch" in r for r in cpu)


def test_cuda_requirements_keep_markers_and_refuse_a_missing_onnxruntime() -> None:
    assert requirements.cuda_requirements(
        ["numpy>=1", "onnxruntime>=1.20; sys_platform == 'linux'", "onnxruntime-extensions"], ">=1.20"
    ) == ["numpy>=1", "onnxruntime-gpu>=1.20; sys_platform == 'linux'", "onnxruntime-extensions"]
    with pytest.raises(ValueError, match="no onnxruntime"):
        requirements.cuda_requirements(["numpy"], ">=1.20")


# --- deploy/healthcheck.py ----------------------------------------------------------------------


@pytest.fixture
def grpc_health() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


def test_grpc_health_check(grpc_health: tuple[int, health.HealthServicer]) -> None:
    port, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1


def test_grpc_health_check_fails_without_a_server(unused_tcp_port: int) -> None:
    assert healthcheck.main(["grpc", f"127.0.0.1:{unused_tcp_port}"]) == 1


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_health_check() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck.main(["http", f"{base}/healthz"]) == 0
        assert healthcheck.main(["http", f"{base}/readyz"]) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_the_wheel_carries_the_files_the_services_read_at_run_time() -> None:
    """The images install the project's wheel: its package data must hold the embedded bundle, the
    prompt templates, the gateway's browser page, the VAD model with its licence and the demo's
    media (setuptools packs only what package-data names)."""
    import tomllib

    package = REPO / "services" / "gemma_mesh"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    packed = {p for pattern in patterns["gemma_mesh"] for p in package.glob(pattern) if p.is_file()}
    needed = [
        package / "model" / "embedded" / "tiny" / "manifest.json",
        *(p for p in (package / "gateway" / "static").rglob("*") if p.is_file()),
        package / "gateway" / "captioning" / "silero" / "silero_vad.onnx",
        package / "gateway" / "captioning" / "silero" / "LICENSE",
        *(p for p in (package / "sample_media").iterdir() if p.is_file()),
    ]
    missing = sorted(str(p.relative_to(package)) for p in needed if p not in packed)
    assert missing == [], f"not in [tool.setuptools.package-data] of pyproject.toml: {missing}"
