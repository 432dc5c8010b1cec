"""A chat service's view: the lean install (`pip install token-ledger`, no consumer extra).

The package is installed from this checkout into a fresh virtualenv with the pinned uv (the
same resolution as pip from the same metadata, in seconds instead of half a minute), and
everything runs from outside the checkout, so only what was installed can be imported.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UV = REPO / ".tools" / "bin" / "uv"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PRODUCER_MODULES = ["producer", *(f"producer.{p.stem}" for p in (REPO / "producer").glob("*.py"))]


def _import_name(requirement: str) -> str:
    # "prometheus-client>=0.21" -> prometheus_client, "sqlalchemy[asyncio]>=2" -> sqlalchemy
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].replace("-", "_").lower()


CONSUMER_ONLY = [_import_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["consumer"]]


@pytest.fixture(scope="module")
def lean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh virtualenv holding `token-ledger` without extras."""
    venv = tmp_path_factory.mktemp("lean") / "venv"
    assert UV.exists(), f"{UV} is missing: `make setup` installs the pinned uv"
    for command in (
        [str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)],
        [str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(REPO)],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin" / "python"


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_base_install_is_the_producer_library_only() -> None:
    assert PYPROJECT["project"]["dependencies"] == [
        "aiokafka[zstd]>=0.13,<0.15",
        "pydantic>=2.9,<3",
    ]
    assert {"asyncpg", "sqlalchemy", "alembic", "typer", "rich"} <= set(CONSUMER_ONLY)


def test_lean_install_imports_the_producer_and_nothing_of_the_consumer(
    lean_python: Path, tmp_path: Path
) -> None:
    probe = (
        "import importlib, sys\n"
        f"for name in {PRODUCER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "from producer.client import TurnEventProducer, UsageAccumulator\n"
        "import producer\n"
        "print(producer.__file__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'consumer'))\n"
    )
    result = _run(lean_python, "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    location, consumer_modules = result.stdout.splitlines()
    assert "site-packages" in location and str(REPO) not in location  # the installed copy
    assert consumer_modules == "[]"
    for module in CONSUMER_ONLY:
        missing = _run(lean_python, "-c", f"import {module}", cwd=tmp_path)
        assert missing.returncode == 1, f"{module} is installed without the consumer extra"
        assert f"No module named '{module}'" in missing.stderr


def test_the_console_script_without_the_extra_says_what_to_install(
    lean_python: Path, tmp_path: Path
) -> None:
    result = _run(lean_python.parent / "token-ledger", "--help", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "pip install 'token-ledger[consumer]'" in result.stderr
