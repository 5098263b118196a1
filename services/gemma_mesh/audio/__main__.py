"""``python -m gemma_mesh.audio --bundle DIR --port N --metrics-port M``: the audio frontend.

The same as ``gemma-mesh serve audio``; every other setting comes from ``GEMMA_MESH_AUDIO_*``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gemma_mesh.audio.server import run_audio_server
from gemma_mesh.audio.settings import AudioSettings


def main(argv: list[str] | None = None) -> None:
    """Parse the flags that override the environment and run the server."""
    parser = argparse.ArgumentParser(prog="python -m gemma_mesh.audio", description=__doc__)
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the embedded tiny bundle)")
    parser.add_argument("--host", help="interface to bind")
    parser.add_argument("--port", type=int, help="gRPC port (0 = a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    run_audio_server(AudioSettings(**overrides))


if __name__ == "__main__":
    main()
