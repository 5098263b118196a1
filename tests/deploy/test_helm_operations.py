"""helm/gemma-mesh rendered for operations: network isolation, scraping, config checksums and
rollouts, drain against the termination grace, scaling (HPA, KEDA, prometheus-adapter), GPU
resource names, the bundled Redis and the export Job."""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_helpers import (
    BACKENDS,
    CHART,
    COMPONENTS,
    DEPLOY,
    EXPORT_VALUES,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    by_kind,
    component_env,
    import_helm,
    kube_version,
    pod_labels,
    production_values,
    selects,
)


def test_only_the_gateway_is_reachable_from_outside(manifests: list[dict[str, Any]]) -> None:
    policies = list(by_kind(manifests, "NetworkPolicy").values())
    pods = {
        f"{m['kind']}/{m['metadata']['name']}": m["spec"]["template"]["metadata"]["labels"]
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    for workload, labels in pods.items():
        assert any(selects(p["spec"]["podSelector"]["matchLabels"], labels) for p in policies), (
            f"{workload} is selected by no NetworkPolicy"
        )
    gateway_labels = pod_labels(manifests, "gateway")
    for policy in policies:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        selected = spec["podSelector"]["matchLabels"]
        if selects(selected, gateway_labels):
            continue  # test_prometheus_may_scrape_the_gateway
        for rule in spec["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to every source"
            for peer in rule["from"]:
                from_gateway = (
                    peer.get("podSelector", {}).get("matchLabels")
                    == {k: gateway_labels[k] for k in peer.get("podSelector", {}).get("matchLabels", {})}
                    and "namespaceSelector" not in peer
                )
                from_prometheus = "namespaceSelector" in peer and rule["ports"] == [
                    {"port": 9090, "protocol": "TCP"}
                ]
                assert from_gateway or from_prometheus, f"{policy['metadata']['name']}: {peer}"


def test_service_monitor_scrapes_each_component_once(production_manifests: list[dict[str, Any]]) -> None:
    (monitor,) = by_kind(production_manifests, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = {}
    for name, service in by_kind(production_manifests, "Service").items():
        if selects(selector, service["metadata"]["labels"]):
            ports = {p["name"] for p in service["spec"]["ports"]} & endpoint_ports
            assert len(ports) == 1, f"{name}: scraped on {ports}"
            scraped[service["metadata"]["labels"]["app.kubernetes.io/component"]] = name
    assert scraped == {c: f"{FULLNAME}-{c}" for c in COMPONENTS}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_prometheus_may_scrape_the_gateway(manifests: list[dict[str, Any]]) -> None:
    """/metrics lives on the gateway's metrics port, which its policy opens to Prometheus alone, and
    the ServiceMonitor scrapes there (on the public port, ingressFrom kept Prometheus out)."""
    gateway = by_kind(manifests, "Deployment")[f"{FULLNAME}-gateway"]["spec"]["template"]["spec"]
    metrics_port = _port(gateway["containers"][0], "metrics")
    assert metrics_port != _port(gateway["containers"][0], "http")
    assert component_env(manifests, "gateway")["GEMMA_MESH_GATEWAY_METRICS_PORT"] == str(metrics_port)
    policy = by_kind(manifests, "NetworkPolicy")[f"{FULLNAME}-gateway"]
    backend_policy = by_kind(manifests, "NetworkPolicy")[f"{FULLNAME}-decoder"]
    prometheus_peer = backend_policy["spec"]["ingress"][1]["from"]
    rules = [
        r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": metrics_port, "protocol": "TCP"}]
    ]
    assert [r["from"] for r in rules] == [prometheus_peer]
    assert prometheus_peer[0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    service = by_kind(manifests, "Service")[f"{FULLNAME}-gateway"]
    assert {"name": "metrics", "port": metrics_port} in [
        {"name": p["name"], "port": p["port"]} for p in service["spec"]["ports"]
    ]


def test_the_ingress_routes_neither_metrics_nor_probes(production_manifests: list[dict[str, Any]]) -> None:
    (ingress,) = by_kind(production_manifests, "Ingress").values()
    paths = [(p["path"], p["pathType"]) for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert paths == [("/v1", "Prefix"), ("/static", "Prefix"), ("/", "Exact")]

    def routed(url: str) -> bool:
        return any(url == p if kind == "Exact" else url.startswith(p.rstrip("/") + "/") for p, kind in paths)

    assert routed("/v1/stream") and routed("/") and routed("/static/app.js")
    assert not any(routed(url) for url in ("/metrics", "/readyz", "/healthz", "/docs"))


def _checksums(manifests: list[dict[str, Any]]) -> dict[str, str]:
    deployments = by_kind(manifests, "Deployment")
    return {
        c: deployments[f"{FULLNAME}-{c}"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for c in COMPONENTS
    }


@pytest.mark.parametrize(
    ("values", "rolled"),
    [
        ({"gateway": {"settings": {"max_sessions_per_key": 3}}}, {"gateway"}),
        ({"decoder": {"settings": {"max_batch_size": 8}}}, {"decoder"}),
        ({"vision": {"settings": {"max_batch_size": 4}}}, {"vision"}),
        # The gateway dials the decoder's port: both roll.
        ({"decoder": {"port": 50061}}, {"decoder", "gateway"}),
    ],
    ids=["gateway setting", "decoder setting", "vision setting", "decoder port"],
)
def test_config_checksums_roll_only_the_components_concerned(
    render: Any, default_manifests: list[dict[str, Any]], values: dict[str, Any], rolled: set[str]
) -> None:
    before = _checksums(default_manifests)
    after = _checksums(render(values))
    assert {c for c in COMPONENTS if before[c] != after[c]} == rolled


def test_config_checksum_is_the_configmaps_content(default_manifests: list[dict[str, Any]]) -> None:
    import hashlib

    for c in COMPONENTS:
        data = by_kind(default_manifests, "ConfigMap")[f"{FULLNAME}-{c}"]["data"]
        text = "".join(f"\n{k}: {json.dumps(v)}" for k, v in sorted(data.items()))
        assert _checksums(default_manifests)[c] == hashlib.sha256(text.encode()).hexdigest(), c


def test_drain_fits_the_termination_grace(manifests: list[dict[str, Any]]) -> None:
    """preStop sleep, then the drain (the services' setting, from the chart), then a margin: all
    inside terminationGracePeriodSeconds."""
    deployments = by_kind(manifests, "Deployment")
    for c in COMPONENTS:
        pod = deployments[f"{FULLNAME}-{c}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        key = "DRAIN_GRACE_S" if c == "gateway" else "SHUTDOWN_GRACE_S"
        drain = float(component_env(manifests, c)[f"GEMMA_MESH_{c.upper()}_{key}"])
        margin = 5 if c == "gateway" else 2  # the gateway's 3 s for HTTP requests after the sessions
        assert sleep >= 1 and drain >= 1
        assert sleep + drain + margin == pod["terminationGracePeriodSeconds"], c


def test_a_grace_too_short_for_the_drain_fails(chart: Any) -> None:
    helm = import_helm()
    values = {"gateway": {"terminationGracePeriodSeconds": 8, "preStopSleepSeconds": 5}}
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_progress_deadline_exceeds_the_startup_budget(manifests: list[dict[str, Any]]) -> None:
    for name, deployment in by_kind(manifests, "Deployment").items():
        probe = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        budget = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
        assert deployment["spec"]["progressDeadlineSeconds"] > budget, name


def test_encoders_may_use_mig_slices(render: Any) -> None:
    values = copy.deepcopy(production_values())
    values["audio"]["gpuResourceName"] = "nvidia.com/mig-1g.10gb"
    values["vision"]["gpuResourceName"] = "nvidia.com/mig-2g.20gb"
    deployments = by_kind(render(values), "Deployment")
    limits = {
        c: deployments[f"{FULLNAME}-{c}"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for c in BACKENDS
    }
    assert limits["decoder"]["nvidia.com/gpu"] == 1
    assert limits["audio"]["nvidia.com/mig-1g.10gb"] == 1 and "nvidia.com/gpu" not in limits["audio"]
    assert limits["vision"]["nvidia.com/mig-2g.20gb"] == 1 and "nvidia.com/gpu" not in limits["vision"]


def test_gateway_scales_down_one_pod_at_a_time(production_manifests: list[dict[str, Any]]) -> None:
    hpa = by_kind(production_manifests, "HorizontalPodAutoscaler")[f"{FULLNAME}-gateway"]
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]


KEDA_VALUES = {"decoder": {"autoscaling": {"enabled": True, "keda": {"enabled": True}}}}


def test_keda_scales_the_decoder_on_queue_depth_with_a_fallback(render: Any) -> None:
    manifests = render(KEDA_VALUES)
    assert f"{FULLNAME}-decoder" not in by_kind(manifests, "HorizontalPodAutoscaler")
    scaled = by_kind(manifests, "ScaledObject")[f"{FULLNAME}-decoder"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": f"{FULLNAME}-decoder"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == (
        f'sum(gemma_mesh_decoder_queue_depth{{namespace="{NAMESPACE}",job="{FULLNAME}-decoder"}})'
    )
    assert trigger["metadata"]["threshold"] == "4"
    assert "replicas" not in by_kind(manifests, "Deployment")[f"{FULLNAME}-decoder"]["spec"]


def test_keda_needs_a_query_where_there_is_no_default(chart: Any) -> None:
    helm = import_helm()
    values = {"vision": {"autoscaling": {"enabled": True, "keda": {"enabled": True}}}}
    with pytest.raises(helm.HelmError, match=r"vision\.autoscaling\.keda\.query"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_the_prometheus_adapter_rule_serves_every_hpa_metric() -> None:
    """deploy/prometheus-adapter/values.yaml serves every Pods metric the HPAs of the default and
    production values ask for, under the same name, mapped to pods."""
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    selector = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])[1]
    wanted = {
        metric["name"]
        for values in (yaml.safe_load((CHART / "values.yaml").read_text()), production_values())
        for c in COMPONENTS
        for metric in values[c]["autoscaling"].get("podsMetrics", [])
    }
    assert wanted == {"gemma_mesh_decoder_queue_depth", "gemma_mesh_vision_queue_depth"}
    for name in wanted:
        assert re.fullmatch(selector, name), name
        assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), name) == name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_bundled_redis_has_a_memory_cap_below_its_limit(default_manifests: list[dict[str, Any]]) -> None:
    redis = by_kind(default_manifests, "StatefulSet")[f"{FULLNAME}-redis"]["spec"]["template"]["spec"]
    container = redis["containers"][0]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    cap = args[args.index("--maxmemory") + 1]
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
    limit = container["resources"]["limits"]["memory"]
    limit_bytes = int(limit[:-2]) * {"Mi": 1024**2, "Gi": 1024**3}[limit[-2:]]
    assert int(cap[:-2]) * units[cap[-2:]] < limit_bytes


def test_export_job_checks_it_can_write_and_leaves_a_readable_bundle(render: Any) -> None:
    values = copy.deepcopy(EXPORT_VALUES)
    values["exportJob"]["podSecurityContext"] = {"runAsUser": 65534, "runAsGroup": 65534}
    (job,) = by_kind(render(values), "Job").values()
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65534 and pod["securityContext"]["runAsGroup"] == 65534
    assert pod["securityContext"]["runAsNonRoot"] is True  # the rest of podSecurityContext stays
    script = pod["containers"][0]["args"][0]
    assert script.index(".gemma-mesh-write-test") < script.index("gemma-mesh export")
    assert script.index('chmod -R a+rX "$DEST.partial"') < script.index('mv "$DEST.partial" "$DEST"')
    (default_job,) = by_kind(render(EXPORT_VALUES), "Job").values()
    assert default_job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_bundled_redis_password_reaches_redis_and_the_gateway(render: Any) -> None:
    import kubernetes_validate

    manifests = render({"redis": {"auth": {"password": "s3cret-redis-password"}}})
    for doc in manifests:
        kubernetes_validate.validate(doc, kube_version("1.27.0"), strict=True)
    secret = by_kind(manifests, "Secret")[f"{FULLNAME}-redis-auth"]
    assert base64.b64decode(secret["data"]["redis-password"]) == b"s3cret-redis-password"
    ref = {"secretKeyRef": {"name": f"{FULLNAME}-redis-auth", "key": "redis-password"}}

    redis = by_kind(manifests, "StatefulSet")[f"{FULLNAME}-redis"]["spec"]["template"]["spec"]
    container = redis["containers"][0]
    assert container["args"][container["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"] == ref
    assert env["REDISCLI_AUTH"]["value"] == "$(REDIS_PASSWORD)"  # the readiness probe's redis-cli

    gateway = by_kind(manifests, "Deployment")[f"{FULLNAME}-gateway"]["spec"]["template"]["spec"]
    names = [e["name"] for e in gateway["containers"][0]["env"]]
    env = {e["name"]: e for e in gateway["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"] == ref
    # Defined before the URL that refers to it: the kubelet expands only earlier variables.
    assert names.index("REDIS_PASSWORD") < names.index("GEMMA_MESH_GATEWAY_REDIS_URL")
    assert env["GEMMA_MESH_GATEWAY_REDIS_URL"]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    )
    configmap = by_kind(manifests, "ConfigMap")[f"{FULLNAME}-gateway"]["data"]
    assert "GEMMA_MESH_GATEWAY_REDIS_URL" not in configmap  # envFrom values are not expanded


def test_bundled_redis_without_a_password_is_unchanged(default_manifests: list[dict[str, Any]]) -> None:
    redis = by_kind(default_manifests, "StatefulSet")[f"{FULLNAME}-redis"]["spec"]["template"]["spec"]
    assert "--requirepass" not in redis["containers"][0]["args"]
    assert f"{FULLNAME}-redis-auth" not in by_kind(default_manifests, "Secret")
