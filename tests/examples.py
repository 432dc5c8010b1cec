"""The canonical example events of the shared contract (../shared/examples), as test data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Copied from the shared contract so that a fresh clone is self-contained; a test checks they
# still match the shared originals when those are present.
EXAMPLES_DIR = Path(__file__).parent / "examples"
SHARED_EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "shared" / "examples"


def example_bytes(name: str) -> bytes:
    return (EXAMPLES_DIR / f"{name}.json").read_bytes()


def example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(example_bytes(name))
    return loaded


EXAMPLE_NAMES = ("turn.started", "turn.finalized", "message.appended", "message.appended.v0")
