"""deploy/compose.yaml, its GPU override, the Prometheus scrape targets and the Grafana provisioning:
no Docker engine runs in CI, so what compose would resolve is checked by reading the files."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_helpers import BACKENDS, COMPONENTS, DEPLOY, REPO, settings_class

COMPOSE = DEPLOY / "compose.yaml"
GRPC_PORTS = {"decoder": 50051, "audio": 50052, "vision": 50053}
GATEWAY_PORT = 8000
METRICS_PORT = 9090


def _interpolate(value: Any, environ: dict[str, str] | None = None) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` with an empty environment."""
    environ = environ or {}
    if isinstance(value, dict):
        return {k: _interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        if environ.get(name):
            return environ[name]
        if op == ":?":
            raise KeyError(f"{name} must be set: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}", one, value)


def _compose(*files: str) -> dict[str, Any]:
    """The files merged the way ``docker compose -f a -f b`` merges services (mappings deep-merged)."""

    def merge(base: Any, override: Any) -> Any:
        if isinstance(base, dict) and isinstance(override, dict):
            return {
                k: merge(base[k], override[k])
                if k in base and k in override
                else base.get(k, override.get(k))
                for k in base | override
            }
        return override

    merged: dict[str, Any] = {}
    for name in files:
        merged = merge(merged, yaml.safe_load((DEPLOY / name).read_text()))
    return _interpolate(merged)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose("compose.yaml")


def _dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))


def test_the_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*COMPONENTS, "redis", "prometheus", "grafana", "exporter"}
    assert compose["services"]["exporter"]["profiles"] == ["export"]


def test_builds_use_dockerfile_targets(compose: dict[str, Any]) -> None:
    targets = _dockerfile_targets()
    gpu = _compose("compose.yaml", "compose.gpu.yaml")
    for stack, suffix in ((compose, ""), (gpu, "-cuda")):
        for name, service in stack["services"].items():
            if "build" not in service:
                continue
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
            assert build["target"] in targets, f"{name}: unknown target {build['target']}"
            if name in BACKENDS:
                assert build["target"] == name + suffix
                assert service["image"].split(":")[0].endswith(build["target"])
    for name in BACKENDS:
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_serving_containers_are_hardened(compose: dict[str, Any]) -> None:
    for name in COMPONENTS:
        service = compose["services"][name]
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_backends_mount_a_bundle_read_only(compose: dict[str, Any]) -> None:
    for name in BACKENDS:
        service = compose["services"][name]
        (volume,) = service["volumes"]
        assert volume["target"] == "/bundle" and volume["read_only"] is True
        assert service["environment"][f"GEMMA_MESH_{name.upper()}_BUNDLE"] == "/bundle"
        # Without GEMMA_MESH_BUNDLE_DIR: the repository's embedded tiny bundle.
        assert (DEPLOY / volume["source"] / "manifest.json").is_file(), volume["source"]


def test_environment_is_what_the_settings_classes_read(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in COMPONENTS:
        cls = settings_class(name)
        env = compose["services"][name]["environment"]
        prefix = f"GEMMA_MESH_{name.upper()}_"
        fields = {f.upper() for f in cls.model_fields}
        unknown = {k for k in env if not k.startswith(prefix) or k.removeprefix(prefix) not in fields}
        assert unknown == set(), f"{name}: {sorted(unknown)}"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, str(value))
            cls()  # the values parse (JSON lists included)


def test_gateway_reaches_every_backend_by_service_name(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    for name in BACKENDS:
        assert env[f"GEMMA_MESH_GATEWAY_{name.upper()}_TARGET"] == f"dns:///{name}:{GRPC_PORTS[name]}"
        assert gateway["depends_on"][name] == {"condition": "service_healthy"}
        assert str(GRPC_PORTS[name]) in compose["services"][name]["expose"]
    assert env["GEMMA_MESH_GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["ports"] == [f"127.0.0.1:8000:{GATEWAY_PORT}"]
    assert json.loads(env["GEMMA_MESH_GATEWAY_API_KEYS"]) and json.loads(
        env["GEMMA_MESH_GATEWAY_ALLOWED_ORIGINS"]
    )


def test_images_listen_where_compose_and_prometheus_look() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for name, port in GRPC_PORTS.items():
        for target in (name, f"{name}-cuda"):
            stage = dockerfile.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
            assert f"GEMMA_MESH_{name.upper()}_PORT={port}" in stage, target
            assert f"GEMMA_MESH_{name.upper()}_METRICS_PORT={METRICS_PORT}" in stage, target
            assert f"GEMMA_MESH_{name.upper()}_HOST=0.0.0.0" in stage, target
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        sd["names"][0]: sd["port"] for job in scrape["scrape_configs"] for sd in job.get("dns_sd_configs", [])
    }
    assert targets == {**dict.fromkeys(BACKENDS, METRICS_PORT), "gateway": GATEWAY_PORT}


def test_prometheus_and_grafana_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    rules = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in rules


def test_grafana_provisioning_points_at_the_dashboard(compose: dict[str, Any]) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert (
        datasources[0]["url"] == f"http://prometheus:{METRICS_PORT}"
        and datasources[0]["type"] == "prometheus"
    )
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "gemma-mesh.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/gemma-mesh.json"


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "gemma-mesh.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for series in (
        "gemma_mesh_decoder_time_to_first_token_seconds_bucket",
        "gemma_mesh_decoder_inter_token_latency_seconds_bucket",
        "gemma_mesh_gateway_caption_partial_latency_seconds_bucket",
        "gemma_mesh_gateway_caption_final_latency_seconds_bucket",
        "gemma_mesh_gateway_active_sessions",
        "gemma_mesh_gateway_frames_dropped_total",
        "gemma_mesh_decoder_errors_total",
        "gemma_mesh_decoder_queue_depth",
    ):
        assert series in exprs, series


def test_the_embedded_bundle_path_is_real() -> None:
    assert (REPO / "services" / "gemma_mesh" / "model" / "embedded" / "tiny" / "manifest.json").is_file()
