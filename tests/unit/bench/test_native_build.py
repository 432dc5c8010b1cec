"""bench/native.py: an exported tree imports the native module built from its own native/,
not .venv's build of the working tree (which a change of native/ would be measured against)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.native import build_native, module_path

ROOT = Path(__file__).resolve().parents[3]


def test_a_tree_imports_the_native_module_of_its_own_native_sources(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "native", tmp_path / "native", ignore=shutil.ignore_patterns("target"))
    build_native(tmp_path)
    assert module_path(tmp_path).is_file()
    imported = subprocess.run(
        [sys.executable, "-c", "import token_ledger_native as n; print(n.__file__, n.Columns)"],
        # As bench/consumers.py runs a tree: from its root, on its PYTHONPATH.
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(imported[0]) == module_path(tmp_path)


def test_a_tree_without_native_sources_builds_nothing(tmp_path: Path) -> None:
    build_native(tmp_path)  # a commit before the native path
    assert list(tmp_path.iterdir()) == []
