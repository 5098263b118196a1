"""``metrics_port``: the gateway's Prometheus metrics on a port of their own (the chart's NetworkPolicy
admits Prometheus there, and the Ingress, which routes the main port, never exposes them)."""

from __future__ import annotations

import httpx

from tests.gateway.mesh import Backends, GatewayThread, free_port


def test_metrics_move_off_the_main_port(embedded_backends: Backends) -> None:
    metrics_port = free_port()
    with GatewayThread(embedded_backends.gateway_settings(metrics_port=metrics_port)) as url:
        httpx.get(f"{url}/readyz", timeout=10)  # sets the capability gauges
        main = httpx.get(f"{url}/metrics", timeout=10)
        assert main.status_code == 404
        assert str(metrics_port) in main.json()["error"]["message"]
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'gemma_mesh_gateway_capability_up{capability="chat"} 1.0' in text
        assert "gemma_mesh_gateway_active_sessions" in text
