"""Paths, tool checks and manifest helpers shared by the deployment tests (tests/deploy)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = REPO / "helm" / "gemma-mesh"
CRDS = Path(__file__).resolve().parent / "crds"

RELEASE = "gemma-mesh"
NAMESPACE = "gemma-mesh"
BACKENDS = ("decoder", "audio", "vision")
COMPONENTS = (*BACKENDS, "gateway")


def require_tool(name: str, install: str) -> str:
    """The path of executable ``name``; fails (never skips) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {install}", pytrace=False)
    return path


def import_helm() -> Any:
    try:
        import helm_python
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        pytest.fail(f"helm-python-sdk is not installed ({exc}): pip install -e '.[test]'", pytrace=False)
    return helm_python


def production_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values-production.yaml").read_text())


def parse_manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a ``Chart.render`` result (NOTES.txt and empty documents dropped)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def settings_class(component: str) -> type:
    """The pydantic-settings class that reads ``GEMMA_MESH_<COMPONENT>_*``."""
    from gemma_mesh.audio.settings import AudioSettings
    from gemma_mesh.decoder.settings import DecoderSettings
    from gemma_mesh.gateway.settings import GatewaySettings
    from gemma_mesh.vision.settings import VisionSettings

    return {
        "decoder": DecoderSettings,
        "audio": AudioSettings,
        "vision": VisionSettings,
        "gateway": GatewaySettings,
    }[component]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def pod_specs(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``"Kind/name"`` -> pod spec of every workload (Deployment, StatefulSet, Job)."""
    return {
        f"{m['kind']}/{m['metadata']['name']}": m["spec"]["template"]["spec"]
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")
    }


FULLNAME = RELEASE  # the release is named like the chart


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(manifests: list[dict[str, Any]], component: str) -> dict[str, str]:
    kind = "StatefulSet" if component == "redis" else "Deployment"
    workload = by_kind(manifests, kind)[f"{FULLNAME}-{component}"]
    return workload["spec"]["template"]["metadata"]["labels"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def component_env(manifests: list[dict[str, Any]], component: str) -> dict[str, str]:
    """What the component's container sees: its ConfigMap, then literal env values."""
    env = dict(by_kind(manifests, "ConfigMap")[f"{FULLNAME}-{component}"]["data"])
    pod = by_kind(manifests, "Deployment")[f"{FULLNAME}-{component}"]["spec"]["template"]["spec"]
    for var in pod["containers"][0].get("env", []):
        env[var["name"]] = var.get("value", "<secret>")
    return env


# The chart's minimum (Chart.yaml kubeVersion: native gRPC probes) and the newest release whose
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "latest")

# Values that turn on the bundle volume and the export Job.
EXPORT_VALUES = {
    "bundle": {"enabled": True},
    "exportJob": {"enabled": True, "checkpoint": {"existingClaim": "gemma-checkpoint"}},
}


def kube_version(version: str) -> str:
    """``version``, or kubernetes-validate's newest for ``"latest"``."""
    import kubernetes_validate

    return kubernetes_validate.latest_version() if version == "latest" else version
