"""Compare two bundle directories: what "the embedded bundle is current" means.

Graphs, tokenizer and configs must be byte-identical; the manifest must be identical except for the
measured ONNX-vs-PyTorch differences (floating-point measurements that move with the ONNX Runtime
release), which must stay within the fp32 parity bound.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

PARITY_BOUND = 1e-4


def _manifest_without_measurements(path: Path) -> object:
    """The manifest with the measured ONNX-vs-PyTorch differences rounded away: they are floating-point
    measurements that move with the ONNX Runtime release, unlike the bundle's content."""

    def scrub(value: object) -> object:
        if isinstance(value, dict):
            return {
                k: (v <= PARITY_BOUND if k.startswith("max_abs_diff") else scrub(v)) for k, v in value.items()
            }
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return scrub(json.loads(path.read_text(encoding="utf-8")))


def stale_files(fresh: Path, committed: Path) -> list[str]:
    """Names of files that differ between two bundle directories (missing on either side included).

    Graphs, tokenizer and configs must be byte-identical; the manifest must be identical except for
    its measured differences, which must stay within the 1e-4 parity bound.
    """
    names = {p.name for p in fresh.iterdir()} | {p.name for p in committed.iterdir()}
    stale = []
    for n in sorted(names):
        a, b = fresh / n, committed / n
        if not a.exists() or not b.exists():
            stale.append(n)
        elif n == "manifest.json":
            if _manifest_without_measurements(a) != _manifest_without_measurements(b):
                stale.append(n)
        elif not filecmp.cmp(a, b, shallow=False):
            stale.append(n)
    return stale
