"""`token-ledger --version`: the installed release and the newest migration it carries, with no
setting and no service needed (docs/operations.md#schema-revisions-and-rolling-deploys)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = Path(sys.executable).parent / "token-ledger"


def newest_migration_file() -> str:
    """The revision id written in the highest-numbered file of migrations/versions."""
    newest = max((REPO / "migrations" / "versions").glob("[0-9]*_*.py"))
    found = re.search(r'^revision: str = "(\d+)"$', newest.read_text(), re.MULTILINE)
    assert found, newest
    return found.group(1)


def test_version_prints_the_release_and_the_newest_migration(tmp_path: Path) -> None:
    release = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    result = subprocess.run(
        [SCRIPT, "--version"],
        cwd=tmp_path,  # no .env: nothing configured
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"token-ledger {release} (newest migration {newest_migration_file()})\n"
