"""helm/gemma-mesh rendered with the Helm SDK (default values and values-production.yaml), linted,
validated against the Kubernetes OpenAPI schemas (kubernetes-validate --strict) and the
prometheus-operator CRD schemas, and checked for what the cluster cannot check: probes, resources,
security contexts, PDBs, autoscaling, network isolation, settings names and the gRPC targets."""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from gemma_mesh.common.health import LIVENESS_SERVICE
from tests.deploy.deploy_helpers import (
    BACKENDS,
    CHART,
    COMPONENTS,
    CRDS,
    DEPLOY,
    EXPORT_VALUES,
    FULLNAME,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    by_kind,
    component_env,
    containers,
    import_helm,
    kube_version,
    pod_labels,
    pod_specs,
    production_values,
    selects,
    settings_class,
)

# --- lint and schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("values_name", ["default", "production"])
def test_chart_lints_clean(values_name: str) -> None:
    helm = import_helm()
    values = production_values() if values_name == "production" else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("version_name", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(manifests: list[dict[str, Any]], version_name: str) -> None:
    import kubernetes_validate

    version = kube_version(version_name)
    crd_kinds = {"ServiceMonitor", "PrometheusRule"}
    for doc in manifests:
        if doc["kind"] in crd_kinds:
            continue  # test_monitoring_objects_match_their_crds
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version}")


def test_strict_validation_rejects_unknown_fields(default_manifests: list[dict[str, Any]]) -> None:
    """The validator is strict: a misspelt field fails (so a passing chart means something)."""
    import kubernetes_validate

    deployment = copy.deepcopy(by_kind(default_manifests, "Deployment")[f"{FULLNAME}-decoder"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube_version("latest"), strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(plural: str) -> jsonschema.Draft7Validator:
    schema = json.loads((CRDS / f"monitoring.coreos.com_{plural}.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def test_monitoring_objects_match_their_crds(production_manifests: list[dict[str, Any]]) -> None:
    monitors = by_kind(production_manifests, "ServiceMonitor")
    rules = by_kind(production_manifests, "PrometheusRule")
    assert len(monitors) == 1 and len(rules) == 1
    for plural, objects in (("servicemonitors", monitors), ("prometheusrules", rules)):
        validator = _crd_validator(plural)
        for name, obj in objects.items():
            errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(obj)]
            assert errors == [], f"{obj['kind']}/{name}: {errors}"
        assert all(o["apiVersion"] == "monitoring.coreos.com/v1" for o in objects.values())


def test_crd_validation_rejects_mistakes(production_manifests: list[dict[str, Any]]) -> None:
    monitor = copy.deepcopy(next(iter(by_kind(production_manifests, "ServiceMonitor").values())))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(_crd_validator("servicemonitors").iter_errors(monitor))
    rule = copy.deepcopy(next(iter(by_kind(production_manifests, "PrometheusRule").values())))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "ten minutes"
    assert list(_crd_validator("prometheusrules").iter_errors(rule))


def test_monitoring_objects_are_behind_flags(default_manifests: list[dict[str, Any]]) -> None:
    kinds = {m["kind"] for m in default_manifests}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds


def test_prometheus_rule_is_the_deploy_rule_file(production_manifests: list[dict[str, Any]]) -> None:
    source = DEPLOY / "prometheus" / "rules" / "gemma-mesh.rules.yml"
    copy_in_chart = CHART / "files" / "gemma-mesh.rules.yml"
    assert copy_in_chart.read_bytes() == source.read_bytes(), (
        f"{copy_in_chart} differs from {source}: cp {source} {copy_in_chart}"
    )
    rule = next(iter(by_kind(production_manifests, "PrometheusRule").values()))
    assert rule["spec"]["groups"] == yaml.safe_load(source.read_text())["groups"]


# --- containers ----------------------------------------------------------------------------------


def test_every_container_has_resources_and_a_locked_down_security_context(
    manifests: list[dict[str, Any]],
) -> None:
    pods = pod_specs(manifests)
    assert pods
    for workload, pod in pods.items():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, workload
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert pod.get("automountServiceAccountToken") is False, workload
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in containers(pod):
            where = f"{workload} container {c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            if c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], (
                    f"{where}: no /tmp emptyDir"
                )


def test_every_long_running_container_has_three_probes(manifests: list[dict[str, Any]]) -> None:
    for workload, pod in pod_specs(manifests).items():
        if workload.startswith("Job/"):
            continue
        for c in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{workload} container {c['name']} has no {probe}"


def test_grpc_services_use_native_grpc_probes_and_the_gateway_http(
    manifests: list[dict[str, Any]],
) -> None:
    deployments = by_kind(manifests, "Deployment")
    for c in BACKENDS:
        container = deployments[f"{FULLNAME}-{c}"]["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        # Startup and readiness ask "" (loaded, warmed, not draining); liveness its own service
        # (NOT_SERVING only for a broken engine), so a loading or draining pod is never killed.
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port}, (c, probe)
        assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": LIVENESS_SERVICE}
    gateway = deployments[f"{FULLNAME}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_images_are_dockerfile_targets(manifests: list[dict[str, Any]]) -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    for workload, pod in pod_specs(manifests).items():
        for c in containers(pod):
            if c["name"] == "redis":
                continue
            target = c["image"].rsplit("/", 1)[1].split(":")[0]
            assert target in targets, f"{workload}: image {c['image']} is not a deploy/Dockerfile target"


# --- availability and scaling --------------------------------------------------------------------


def test_a_pdb_per_component(manifests: list[dict[str, Any]]) -> None:
    pdbs = list(by_kind(manifests, "PodDisruptionBudget").values())
    components = [*COMPONENTS]
    if by_kind(manifests, "StatefulSet"):
        components.append("redis")
    for component in components:
        labels = pod_labels(manifests, component)
        matching = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, f"{component}: {len(matching)} PodDisruptionBudgets"
        spec = matching[0]["spec"]
        assert ("maxUnavailable" in spec) != ("minAvailable" in spec)


def test_no_hpa_unless_enabled(default_manifests: list[dict[str, Any]]) -> None:
    assert by_kind(default_manifests, "HorizontalPodAutoscaler") == {}
    for deployment in by_kind(default_manifests, "Deployment").values():
        assert deployment["spec"]["replicas"] >= 1


def test_hpas_scale_on_cpu_and_the_decoder_queue(production_manifests: list[dict[str, Any]]) -> None:
    hpas = by_kind(production_manifests, "HorizontalPodAutoscaler")
    deployments = by_kind(production_manifests, "Deployment")
    values = production_values()
    for c in COMPONENTS:
        hpa = hpas[f"{FULLNAME}-{c}"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"{FULLNAME}-{c}",
        }
        assert hpa["spec"]["minReplicas"] == values[c]["autoscaling"]["minReplicas"]
        assert "replicas" not in deployments[f"{FULLNAME}-{c}"]["spec"], f"{c}: HPA and a fixed replica count"
    decoder_metrics = hpas[f"{FULLNAME}-decoder"]["spec"]["metrics"]
    assert {
        "type": "Pods",
        "pods": {
            "metric": {"name": "gemma_mesh_decoder_queue_depth"},
            "target": {"type": "AverageValue", "averageValue": "4"},
        },
    } in decoder_metrics
    gateway_metrics = hpas[f"{FULLNAME}-gateway"]["spec"]["metrics"]
    assert gateway_metrics == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]


# --- values.schema.json --------------------------------------------------------------------------

BAD_VALUES = {
    "negative replicas": {"decoder": {"replicaCount": -1}},
    "replicas as text": {"gateway": {"replicaCount": "two"}},
    "HPA minimum of zero": {"gateway": {"autoscaling": {"minReplicas": 0}}},
    "CPU target over 100%": {"audio": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
    "unknown top-level key": {"decodr": {"replicaCount": 1}},
    "unknown component key": {"vision": {"replicas": 2}},
    "chart-owned setting": {"decoder": {"settings": {"port": 1234}}},
    "setting not snake_case": {"audio": {"settings": {"MaxStreams": 4}}},
    "gateway target as a setting": {"gateway": {"settings": {"decoder_target": "localhost:1"}}},
    "port out of range": {"vision": {"port": 70000}},
    "no resource requests": {"decoder": {"resources": {"requests": None}}},
    "no memory request": {"gateway": {"resources": {"requests": {"memory": None}}}},
    "bad quantity": {"decoder": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}},
    "external Redis without a Secret": {"redis": {"enabled": False}},
    "export without a checkpoint": {"bundle": {"enabled": True}, "exportJob": {"enabled": True}},
    "export without a bundle volume": {
        "exportJob": {"enabled": True, "checkpoint": {"existingClaim": "ckpt"}}
    },
    "unknown export dtype": {"exportJob": {"dtype": "bfloat8"}},
    "bundle path escaping the volume": {"bundle": {"subPath": "../etc"}},
    "root containers": {"podSecurityContext": {"runAsNonRoot": False}},
    "writable root filesystem": {"securityContext": {"readOnlyRootFilesystem": False}},
    "short API key": {"gateway": {"auth": {"apiKeys": ["abc"]}}},
    "PDB without a budget": {"decoder": {"pdb": {"enabled": True, "maxUnavailable": None}}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "often"}}},
    "negative preStop sleep": {"gateway": {"preStopSleepSeconds": -1}},
    "GPU resource without a domain": {"audio": {"gpuResourceName": "mig-1g.10gb"}},
    "chart-owned drain grace": {"gateway": {"settings": {"drain_grace_s": 60}}},
    "chart-owned gateway metrics port": {"gateway": {"settings": {"metrics_port": 1}}},
    "KEDA without a fallback": {"decoder": {"autoscaling": {"keda": {"enabled": True, "fallback": None}}}},
    "ingress path without a slash": {"gateway": {"ingress": {"hosts": [{"host": "a", "paths": ["v1"]}]}}},
    "short Redis password": {"redis": {"auth": {"password": "short"}}},
    "Redis password unsafe in a URL": {"redis": {"auth": {"password": "a/b@c:d#e?f%g&h=long"}}},
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(chart: Any, case: str) -> None:
    helm = import_helm()
    with pytest.raises(helm.HelmError, match="values don't meet the specifications"):
        chart.render(BAD_VALUES[case], name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_the_shipped_values(chart: Any) -> None:
    chart.validate_schema({})
    chart.validate_schema(production_values())
    chart.validate_schema(EXPORT_VALUES)


def test_hpa_minimum_above_maximum_fails(chart: Any) -> None:
    helm = import_helm()
    values = {"decoder": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    with pytest.raises(helm.HelmError, match="minReplicas"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- settings, wiring, isolation -----------------------------------------------------------------


def test_environment_is_what_the_settings_classes_read(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every GEMMA_MESH_* variable names a settings field, and the settings class accepts its value."""
    for component in COMPONENTS:
        cls = settings_class(component)
        prefix = f"GEMMA_MESH_{component.upper()}_"
        env = component_env(manifests, component)
        assert set(env) == {k for k in env if k.startswith(prefix)}, f"{component}: foreign variables"
        fields = {name.upper() for name in cls.model_fields}
        unknown = {k for k in env if k.removeprefix(prefix) not in fields}
        assert not unknown, f"{component}: {sorted(unknown)} are no fields of {cls.__name__}"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, "x" * 32 if value == "<secret>" and key.endswith("TOKEN_SECRET") else value)
            if env.get(f"{prefix}API_KEYS") == "<secret>":
                m.setenv(f"{prefix}API_KEYS", "[]")
            if env.get(f"{prefix}REDIS_URL") == "<secret>":  # from the external Redis Secret
                m.setenv(f"{prefix}REDIS_URL", "redis://redis.example:6379/0")
            settings = cls()
        assert settings.host == "0.0.0.0"
        if component != "gateway":
            assert settings.port == int(env[f"{prefix}PORT"]) and settings.metrics_port == 9090


def test_gateway_targets_are_the_headless_services(manifests: list[dict[str, Any]]) -> None:
    env = component_env(manifests, "gateway")
    services = by_kind(manifests, "Service")
    for c in BACKENDS:
        target = env[f"GEMMA_MESH_GATEWAY_{c.upper()}_TARGET"]
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
        assert match, target
        name, namespace, port = match[1], match[2], int(match[3])
        assert namespace == NAMESPACE
        service = services[name]
        assert service["spec"]["clusterIP"] == "None", f"{name} must be headless for client-side balancing"
        assert selects(service["spec"]["selector"], pod_labels(manifests, c))
        assert port in [p["port"] for p in service["spec"]["ports"]]


def test_redis_bundled_with_aof_or_external_from_a_secret(
    default_manifests: list[dict[str, Any]], production_manifests: list[dict[str, Any]]
) -> None:
    redis = by_kind(default_manifests, "StatefulSet")[f"{FULLNAME}-redis"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert component_env(default_manifests, "gateway")["GEMMA_MESH_GATEWAY_REDIS_URL"].startswith(
        f"redis://{FULLNAME}-redis.{NAMESPACE}.svc"
    )

    assert by_kind(production_manifests, "StatefulSet") == {}
    gateway = by_kind(production_manifests, "Deployment")[f"{FULLNAME}-gateway"]
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GEMMA_MESH_GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "gemma-mesh-redis",
        "key": "redis-url",
    }


def test_api_keys_and_token_secret_come_from_a_secret(
    default_manifests: list[dict[str, Any]], production_manifests: list[dict[str, Any]]
) -> None:
    secret = by_kind(default_manifests, "Secret")[f"{FULLNAME}-gateway-auth"]
    assert set(secret["data"]) == {"api-keys"}  # no token key: the gateways share one through Redis
    for manifests, secret_name in (
        (default_manifests, f"{FULLNAME}-gateway-auth"),
        (production_manifests, "gemma-mesh-gateway-auth"),
    ):
        gateway = by_kind(manifests, "Deployment")[f"{FULLNAME}-gateway"]
        env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
        for name, key in (
            ("GEMMA_MESH_GATEWAY_API_KEYS", "api-keys"),
            ("GEMMA_MESH_GATEWAY_TOKEN_SECRET", "token-secret"),
        ):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert {k: ref[k] for k in ("name", "key")} == {"name": secret_name, "key": key}
        token_ref = env["GEMMA_MESH_GATEWAY_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]
        assert token_ref.get("optional") is True
    assert f"{FULLNAME}-gateway-auth" not in by_kind(production_manifests, "Secret")


def test_the_auth_secret_renders_the_same_every_time(chart: Any, render: Any) -> None:
    """Nothing random in the rendered Secret: a GitOps tool running `helm template` on every sync
    sees no change (and the token secret, when given, is kept as given)."""
    first, second = render({}), render({})
    name = f"{FULLNAME}-gateway-auth"
    assert by_kind(first, "Secret")[name] == by_kind(second, "Secret")[name]
    given = by_kind(render({"gateway": {"auth": {"tokenSecret": "t" * 40}}}), "Secret")[name]
    assert given["data"]["token-secret"] == base64.b64encode(b"t" * 40).decode()


def test_gpus_requested_for_decoder_and_encoders_only(
    default_manifests: list[dict[str, Any]], production_manifests: list[dict[str, Any]]
) -> None:
    for manifests, gpu in ((default_manifests, False), (production_manifests, True)):
        deployments = by_kind(manifests, "Deployment")
        for c in COMPONENTS:
            container = deployments[f"{FULLNAME}-{c}"]["spec"]["template"]["spec"]["containers"][0]
            wants_gpu = gpu and c != "gateway"
            assert ("nvidia.com/gpu" in container["resources"].get("limits", {})) == wants_gpu, c
            assert container["image"].split(":")[0].endswith("-cuda") == wants_gpu, c
            if c != "gateway":
                providers = json.loads(component_env(manifests, c)[f"GEMMA_MESH_{c.upper()}_PROVIDERS"])
                assert providers[0] == ("CUDAExecutionProvider" if wants_gpu else "CPUExecutionProvider")
        if gpu:
            decoder = deployments[f"{FULLNAME}-decoder"]["spec"]["template"]["spec"]
            assert decoder["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in decoder[
                "tolerations"
            ]


def test_bundle_volume_is_read_only_and_the_export_job_writes_it(
    production_manifests: list[dict[str, Any]],
) -> None:
    deployments = by_kind(production_manifests, "Deployment")
    claim = by_kind(production_manifests, "PersistentVolumeClaim")[f"{FULLNAME}-bundle"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for c in BACKENDS:
        pod = deployments[f"{FULLNAME}-{c}"]["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "bundle")
        assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        for container in containers(pod):
            mount = next(m for m in container["volumeMounts"] if m["name"] == "bundle")
            assert mount["mountPath"] == "/bundle" and mount["readOnly"] is True
        assert [i["name"] for i in pod["initContainers"]] == ["wait-for-bundle"]
        assert (
            component_env(production_manifests, c)[f"GEMMA_MESH_{c.upper()}_BUNDLE"]
            == "/bundle/gemma-4-e4b-it-fp16"
        )
    (job,) = by_kind(production_manifests, "Job").values()
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["image"] == "registry.example.com/ml/gemma-mesh/exporter:0.1.0"
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["checkpoint"].get("readOnly") is True and not mounts["bundle"].get("readOnly")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoint"]["persistentVolumeClaim"]["claimName"] == "gemma-4-e4b-it-checkpoint"
    script = pod["containers"][0]["args"][0]
    assert "gemma-mesh export" in script and 'mv "$DEST.partial" "$DEST"' in script
