#!/usr/bin/env python3
"""Regenerate the tiny bundle embedded in the package (services/gemma_mesh/model/embedded/tiny).

    python scripts/build_embedded_bundle.py            # rewrite it
    python scripts/build_embedded_bundle.py --check    # exit 1 if the committed copy is stale

The bundle is ``gemma-mesh make-tiny --seed 0`` exported with ``gemma-mesh export --dtype float32``;
both are deterministic, so the files are byte-identical on any machine with the pinned torch.
tests/model/test_export.py (test_embedded_bundle_is_regenerated_by_make_tiny_and_export) runs the same check in CI.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from gemma_mesh.model.bundle import embedded_bundle_path  # noqa: E402
from gemma_mesh.model.bundle_diff import stale_files  # noqa: E402

# The checkpoint directory's name is recorded in the manifest (source.checkpoint).
CHECKPOINT_NAME = "gemma-mesh-tiny"
SEED = 0


def build(out_dir: Path) -> None:
    """make-tiny (seed 0) + export (fp32) into ``out_dir``."""
    from gemma_mesh.model.export.exporter import export_bundle
    from gemma_mesh.model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / CHECKPOINT_NAME
        make_tiny_checkpoint(checkpoint, seed=SEED, size="tiny")
        export_bundle(checkpoint, out_dir, dtype="float32", progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    args = parser.parse_args()
    target = embedded_bundle_path()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "bundle"
        build(fresh)
        if args.check:
            stale = stale_files(fresh, target) if target.exists() else ["(missing)"]
            if stale:
                print(
                    f"embedded bundle is stale: {stale}; run scripts/build_embedded_bundle.py",
                    file=sys.stderr,
                )
                return 1
            print("embedded bundle is current")
            return 0
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fresh, target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
