#!/usr/bin/env python3
"""Container health check of a gemma-mesh service (Docker HEALTHCHECK; exit 0 = healthy).

    gemma-mesh-healthcheck grpc 127.0.0.1:50051        # grpc.health.v1 Check, overall server status
    gemma-mesh-healthcheck http http://127.0.0.1:8000/healthz

Kubernetes does not use it: the Helm chart's probes are native gRPC and HTTP probes.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request

TIMEOUT_S = 4.0


def check_grpc(target: str, service: str = "") -> str:
    """``SERVING`` or the status name the server reported; raises on connection errors."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def check_http(url: str) -> str:
    """``SERVING`` for a 2xx answer; urllib raises on other statuses and connection errors."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return "SERVING" if 200 <= response.status < 300 else f"HTTP {response.status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gemma-mesh container health check")
    parser.add_argument("kind", choices=["grpc", "http"])
    parser.add_argument("target", help="host:port for grpc, a URL for http")
    parser.add_argument("--service", default="", help="grpc.health.v1 service name ('' = the server)")
    args = parser.parse_args(argv)
    try:
        status = check_grpc(args.target, args.service) if args.kind == "grpc" else check_http(args.target)
    except Exception as exc:
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"unhealthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
