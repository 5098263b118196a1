#!/usr/bin/env python3
"""Generate the Python gRPC stubs from protos/ into services/gemma_mesh/proto/ (never edit those by hand).

    python scripts/gen_protos.py           # regenerate
    python scripts/gen_protos.py --check   # exit 1 if the committed stubs are stale (CI runs this)

protoc emits absolute imports of the proto package (``from gemma_mesh.v1 import common_pb2``), which
would collide with the Python package ``gemma_mesh``; they are rewritten to
``from gemma_mesh.proto.v1 import common_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "services" / "gemma_mesh" / "proto"
IMPORT_RE = re.compile(r"^from gemma_mesh\.v1 import", re.MULTILINE)


def generate(out: Path) -> None:
    """Run grpc_tools.protoc on every protos/gemma_mesh/v1/*.proto into ``out/v1``."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / "gemma_mesh" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = str(Path(grpc_tools.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ]
        if protoc.main([*args, *(str(p.relative_to(PROTO_ROOT)) for p in protos)]) != 0:
            raise SystemExit("protoc failed")
        (out / "v1").mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / "gemma_mesh" / "v1").iterdir()):
            text = IMPORT_RE.sub("from gemma_mesh.proto.v1 import", path.read_text(encoding="utf-8"))
            (out / "v1" / path.name).write_text(text, encoding="utf-8")
    (out / "__init__.py").write_text(
        '"""Generated gRPC stubs (scripts/gen_protos.py). Do not edit."""\n', encoding="utf-8"
    )
    (out / "v1" / "__init__.py").write_text("", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    args = parser.parse_args()
    if not args.check:
        if OUT.exists():
            shutil.rmtree(OUT)
        generate(OUT)
        print(f"wrote {OUT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "proto"
        generate(fresh)
        cmp = filecmp.dircmp(fresh, OUT)
        stale = cmp.diff_files + cmp.left_only + cmp.right_only
        sub = filecmp.dircmp(fresh / "v1", OUT / "v1") if (OUT / "v1").exists() else None
        if sub is None:
            stale.append("v1/")
        else:
            stale += [
                f"v1/{n}" for n in sub.diff_files + sub.left_only + sub.right_only if n != "__pycache__"
            ]
        stale = [n for n in stale if n != "__pycache__"]
        if stale:
            print(f"generated stubs are stale: {stale}; run scripts/gen_protos.py", file=sys.stderr)
            return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
