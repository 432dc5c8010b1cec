"""The usage API's OpenAPI 3.1 document, committed as docs/api/openapi.json for teams that do
not run the service (a test keeps it equal to what `serve` answers at /openapi.json).

    python -m consumer.api.openapi          # rewrite docs/api/openapi.json
    python -m consumer.api.openapi --check  # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from consumer.api.app import build_app

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"


def document() -> dict[str, Any]:
    return build_app().openapi()


def text() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    if args.check:
        if not DOCUMENT.exists() or DOCUMENT.read_text() != text():
            print(f"{DOCUMENT} is stale: run python -m consumer.api.openapi", file=sys.stderr)
            return 1
        return 0
    DOCUMENT.write_text(text())
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
