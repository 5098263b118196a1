"""deploy/prometheus: the scrape config and the rules pass promtool, every alert has unit tests that
fire and stay quiet, and every series the rules and the dashboard read is one the services export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_helpers import CHART, DEPLOY, REPO, require_tool

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "gemma-mesh.rules.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gemma-mesh.json"

# What issue 6 asks to be alerted on.
REQUIRED_ALERTS = {
    "GemmaMeshDecoderErrorRateHigh",
    "GemmaMeshAudioErrorRateHigh",
    "GemmaMeshVisionErrorRateHigh",
    "GemmaMeshGatewayErrorRateHigh",
    "GemmaMeshCaptionPartialLatencyHigh",
    "GemmaMeshCaptionFinalLatencyHigh",
    "GemmaMeshDecoderQueueDepthHigh",
    "GemmaMeshFramesDroppedHigh",
    "GemmaMeshRedisUnavailable",
    # Scrape health: without these a component Prometheus never reaches has no alert at all.
    "GemmaMeshTargetDown",
    "GemmaMeshDecoderAbsent",
    "GemmaMeshAudioAbsent",
    "GemmaMeshVisionAbsent",
    "GemmaMeshGatewayAbsent",
    "GemmaMeshCapabilityLost",
    "GemmaMeshDecoderStepsFailing",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = require_tool("promtool", "apt-get install -y prometheus (Debian's package ships promtool)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_scrape_config_is_valid() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_loads_the_rules(tmp_path: Path) -> None:
    """The config with its rule_files glob pointed at the repository: promtool checks both."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.rules.yml"]  # compose mounts rules/ there
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout + result.stderr


@pytest.mark.parametrize("path", [RULES, CHART / "files" / "gemma-mesh.rules.yml"], ids=["deploy", "chart"])
def test_rules_are_valid(path: Path) -> None:
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_rule_unit_tests_pass(test_file: Path) -> None:
    result = promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_fails_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness can fail: Redis is up, yet the test expects the alert."""
    (tmp_path / "wrong.test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": 'gemma_mesh_gateway_redis_up{job="g",instance="a"}', "values": "1x10"}
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "5m",
                                "alertname": "GemmaMeshRedisUnavailable",
                                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                            }
                        ],
                    }
                ],
            }
        )
    )
    result = promtool("test", "rules", "wrong.test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_the_required_alerts_exist_with_severity_and_text() -> None:
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert REQUIRED_ALERTS <= set(alerts), REQUIRED_ALERTS - set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test_file in RULE_TESTS:
        spec = yaml.safe_load(test_file.read_text())
        assert spec["rule_files"] == ["../rules/gemma-mesh.rules.yml"], test_file.name
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts - firing == set(), f"no firing test: {sorted(alerts - firing)}"
    assert alerts - quiet == set(), f"no quiet test: {sorted(alerts - quiet)}"


# --- the series read exist ------------------------------------------------------------------------

_DECLARED = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(gemma_mesh_\w+)\"")
_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_count", "_sum")}


def exported_series() -> set[str]:
    """Names the services' prometheus-client metrics appear under on /metrics."""
    names: set[str] = set()
    for path in (REPO / "services" / "gemma_mesh").rglob("metrics.py"):
        for kind, name in _DECLARED.findall(path.read_text()):
            names.update(name + suffix for suffix in _SUFFIXES[kind])
    return names


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\bgemma_mesh_[a-z0-9_]+", text))


def test_the_services_export_metrics() -> None:
    exported = exported_series()
    for expected in (
        "gemma_mesh_decoder_queue_depth",
        "gemma_mesh_decoder_time_to_first_token_seconds_bucket",
        "gemma_mesh_gateway_redis_up",
        "gemma_mesh_gateway_caption_final_latency_seconds_bucket",
    ):
        assert expected in exported


@pytest.mark.parametrize("source", [RULES, DASHBOARD], ids=["rules", "dashboard"])
def test_every_series_read_is_exported(source: Path) -> None:
    text = source.read_text()
    if source.suffix == ".json":
        text = " ".join(t["expr"] for p in json.loads(text)["panels"] for t in p.get("targets", []))
    missing = _referenced(text) - exported_series()
    assert missing == set(), f"{source.name} reads series no service exports: {sorted(missing)}"
