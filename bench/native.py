"""Each exported tree runs the native module of its own commit: built from the tree's native/
with cargo and put at the tree's root, which the consumers' PYTHONPATH puts before .venv's
site-packages (bench/consumers.py). So a change of native/ is measured against the crate the
baseline was committed with, not against .venv's build of the working tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

MODULE = "token_ledger_native"
# One target directory for every exported tree: the dependencies are compiled once.
TARGET = Path(__file__).resolve().parent.parent / ".bench" / "native-target"


def module_path(tree: Path) -> Path:
    return tree / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"


def build_native(tree: Path) -> None:
    """Build the tree's native module into its root, unless it has no native/ (a commit before
    the native path: it never imports one) or the module is there already."""
    manifest = tree / "native" / "Cargo.toml"
    if not manifest.is_file() or module_path(tree).is_file():
        return
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    command = [cargo, "build", "--release", "--quiet", "--manifest-path", str(manifest)]
    subprocess.run(
        [*command, "--target-dir", str(TARGET)],
        # PyO3 builds for the interpreter the consumers run with.
        env={**os.environ, "PYO3_PYTHON": sys.executable},
        check=True,
    )
    built = TARGET / "release" / f"lib{MODULE}.so"
    # Copied under a temporary name, then renamed: a build stopped half-way leaves no module
    # that a later run would take for a finished one.
    partial = module_path(tree).with_suffix(".partial")
    shutil.copyfile(built, partial)
    partial.rename(module_path(tree))
