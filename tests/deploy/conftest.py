"""Fixtures of the deployment tests: the chart loaded and rendered with the Helm SDK.

The tools are real (the Helm Go SDK through ``helm-python-sdk``, ``kubernetes-validate``,
``promtool`` from Debian's ``prometheus`` package); a missing one fails the test that needs it
with the command that installs it, never skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy.deploy_helpers import (
    CHART,
    EXPORT_VALUES,
    NAMESPACE,
    RELEASE,
    import_helm,
    parse_manifests,
    production_values,
)


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    helm = import_helm()
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    return parse_manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


@pytest.fixture(scope="session")
def default_manifests(chart: Any) -> list[dict[str, Any]]:
    return _render(chart, {})


@pytest.fixture(scope="session")
def production_manifests(chart: Any) -> list[dict[str, Any]]:
    return _render(chart, production_values())


@pytest.fixture(scope="session")
def render(chart: Any) -> Any:
    """``render(values)`` -> the parsed objects of the chart rendered with ``values``."""
    return lambda values: _render(chart, values)


@pytest.fixture(scope="module", params=["default", "production", "export"])
def manifests(request: pytest.FixtureRequest, render: Any) -> list[dict[str, Any]]:
    """The chart rendered with default values, values-production.yaml, and the export Job on."""
    values = {"default": {}, "production": production_values(), "export": EXPORT_VALUES}[request.param]
    return render(values)
