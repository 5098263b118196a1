#!/usr/bin/env python3
"""Write the serving requirement lists of the container images from ``pyproject.toml``.

``requirements-cpu.txt`` is ``[project].dependencies`` as declared. ``requirements-cuda.txt`` is the
same list with ``onnxruntime`` replaced by ``onnxruntime-gpu``: both distributions install the same
``onnxruntime`` module, so installing one over the other breaks it, and the CUDA images must never
get the CPU build. The project's wheel is then installed with ``--no-deps``.

Usage (deploy/Dockerfile, builder stage)::

    python deploy/requirements.py pyproject.toml /wheels --onnxruntime-gpu ">=1.20"
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

_ONNXRUNTIME = re.compile(r"^onnxruntime(?![\w.-])\s*(?P<spec>[^;]*)(?P<marker>;.*)?$")


def serving_requirements(pyproject: Path) -> list[str]:
    """``[project].dependencies`` of ``pyproject``, in order."""
    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def cuda_requirements(requirements: list[str], gpu_spec: str) -> list[str]:
    """``requirements`` with the ``onnxruntime`` line replaced by ``onnxruntime-gpu{gpu_spec}``."""
    out: list[str] = []
    for requirement in requirements:
        match = _ONNXRUNTIME.match(requirement.strip())
        if match:
            requirement = f"onnxruntime-gpu{gpu_spec}{match['marker'] or ''}"
        out.append(requirement)
    if out == requirements:
        raise ValueError("pyproject.toml declares no onnxruntime requirement to replace")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--onnxruntime-gpu", default=">=1.20", help="version specifier for onnxruntime-gpu")
    args = parser.parse_args(argv)
    cpu = serving_requirements(args.pyproject)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "requirements-cpu.txt").write_text("\n".join(cpu) + "\n")
    cuda = cuda_requirements(cpu, args.onnxruntime_gpu)
    (args.out_dir / "requirements-cuda.txt").write_text("\n".join(cuda) + "\n")


if __name__ == "__main__":
    main()
