"""A chat service's view: the lean install (`pip install token-ledger`, no consumer extra), and
the producer guide's (docs/contract.md), whose example runs from that install against the real broker.

The package is installed from this checkout into a fresh virtualenv with the pinned uv (the
same resolution as pip from the same metadata, in seconds instead of half a minute), and
everything runs from outside the checkout, so only what was installed can be imported.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from types import ModuleType

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from producer.client import TurnEventProducer
from producer.events import AnyEvent
from tests.integration.harness import ConsumerProcess, Stack, ledger_summary

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
        "msgspec>=0.19",
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


def test_the_lean_install_ships_the_type_marker(lean_python: Path, tmp_path: Path) -> None:
    """PEP 561: a chat service's type checker reads the producer's annotations."""
    probe = "import pathlib, producer; print(pathlib.Path(producer.__file__).parent)"
    result = _run(lean_python, "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    installed = Path(result.stdout.strip())
    assert str(REPO) not in str(installed)  # the installed copy, not this checkout
    assert (installed / "py.typed").is_file()


def test_the_console_script_without_the_extra_says_what_to_install(
    lean_python: Path, tmp_path: Path
) -> None:
    result = _run(lean_python.parent / "token-ledger", "--help", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "pip install 'token-ledger[consumer]'" in result.stderr


# -- the producer guide: its example, run as a chat service would run it ----------------------

EXAMPLE = REPO / "examples" / "publish_turn.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("publish_turn", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AckLostOnce(TurnEventProducer):
    """Every event reaches the topic at its first attempt, which then fails as if the broker's
    acknowledgement had been lost: the case where a retry must not make a second event."""

    def __init__(self, bootstrap: str, *, topic: str) -> None:
        super().__init__(bootstrap, topic=topic)
        self.failed: set[uuid.UUID] = set()

    async def publish(self, event: AnyEvent) -> uuid.UUID:
        event_id = await super().publish(event)
        if event_id not in self.failed:
            self.failed.add(event_id)
            raise KafkaTimeoutError("acknowledgement lost (injected)")
        return event_id


async def _values(stack: Stack) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(stack.topic, 0)
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        while len(values) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values += [record.value for record in batch.get(tp, [])]
        return values
    finally:
        await consumer.stop()


def test_the_producer_guide_shows_the_example_as_it_is() -> None:
    readme = (REPO / "docs" / "contract.md").read_text()
    guide = readme[readme.index("## Publishing from a chat service") :]
    assert f"```python\n{EXAMPLE.read_text()}```" in guide


async def test_the_readme_example_publishes_a_turn_that_the_ledger_counts_once(
    lean_python: Path, kafka_bootstrap: str, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    await stack.create_topic()
    # 1. The example as a chat service runs it: the lean install, outside this checkout.
    env = {**stack.env(), "PYTHONPATH": ""}
    ran = await asyncio.create_subprocess_exec(
        lean_python,
        EXAMPLE,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(ran.communicate(), timeout=120)
    assert ran.returncode == 0, err.decode()
    assert f"to {stack.topic}" in out.decode()
    # 2. Its retry, when every first attempt reaches the topic but reports a failure.
    example = _load_example()
    async with AckLostOnce(stack.bootstrap, topic=stack.topic) as events:
        await example.answer(events, thread_id=4243, search_space_id=7, user_id=uuid.uuid4())
    values = await _values(stack)
    assert len(values) == 2 + 2 * 2
    first, second = values[:2]
    assert (values[2], values[4]) == (values[3], values[5])  # a retry is an exact copy
    keys = {json.loads(v)["thread_id"] for v in (first, second)}
    assert keys == {4242}
    # 3. The ledger: two turns, each message and each cost once.
    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log", "--until-idle").start()
    try:
        assert consumer.wait() == 0, consumer.logs()
    finally:
        consumer.stop_quietly()
    summary = await ledger_summary(stack)
    assert (summary["threads"], summary["messages"], summary["usage_rows"]) == (2, 4, 2)
    assert summary["per_model"] == {
        "gpt-4o-mini": {
            "prompt_tokens": 2400,
            "completion_tokens": 600,
            "total_tokens": 3000,
            "cost_micros": 720,
        }
    }
