"""``python -m gemma_mesh.vision --bundle DIR --port N --metrics-port M``: the vision encoder.

The same as ``gemma-mesh serve vision``; every other setting comes from ``GEMMA_MESH_VISION_*``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gemma_mesh.vision.server import run_vision_server
from gemma_mesh.vision.settings import VisionSettings


def main(argv: list[str] | None = None) -> None:
    """Parse the flags that override the environment and run the server."""
    parser = argparse.ArgumentParser(prog="python -m gemma_mesh.vision", description=__doc__)
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the embedded tiny bundle)")
    parser.add_argument("--host", help="interface to bind")
    parser.add_argument("--port", type=int, help="gRPC port (0 = a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    run_vision_server(VisionSettings(**overrides))


if __name__ == "__main__":
    main()
