#!/usr/bin/env python3
"""Write one JSON Schema per ``/v1/stream`` message into docs/schemas/ from ``gateway/protocol.py``.

python scripts/gen_schemas.py           # regenerate
python scripts/gen_schemas.py --check   # exit 1 if the committed schemas are stale (CI runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "schemas"
sys.path.insert(0, str(ROOT / "services"))


def render() -> dict[str, str]:
    """File name -> JSON text of every message's schema (draft 2020-12, as pydantic emits)."""
    from gemma_mesh.gateway.protocol import SCHEMA_MODELS

    files = {}
    for message_type, model in SCHEMA_MODELS.items():
        schema = model.model_json_schema()
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://gemma-mesh.dev/schemas/v1/{message_type}.json",
            **schema,
        }
        files[f"{message_type}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/schemas is stale")
    args = parser.parse_args()
    files = render()
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (OUT / name).exists() or (OUT / name).read_text() != text
        ]
        extra = sorted({p.name for p in OUT.glob("*.json")} - set(files))
        if stale or extra:
            print(
                f"docs/schemas is stale ({stale + extra}): run python scripts/gen_schemas.py", file=sys.stderr
            )
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        if old.name not in files:
            old.unlink()
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(files)} schemas to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
