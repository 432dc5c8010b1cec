"""Differing copies of one event_id end to end: v0 bodies re-sent later and producer retries
that re-stamped the time, through the real consumer in small batches, leave a ledger that
`verify` (an independent rebuild from the topic) finds clean, with every copy applied once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer import jsonvalues
from tests.factories import START
from tests.integration.harness import ConsumerProcess, Stack, ledger_summary


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        process.stop_quietly()


def _restamped(value: bytes) -> bytes | None:
    """The same v1 event (same event_id) with occurred_at moved: a retry that re-stamped."""
    body = jsonvalues.loads(value)
    if body.get("schema_version") != 1:
        return None
    occurred = datetime.fromisoformat(body["occurred_at"])
    body["occurred_at"] = (occurred + timedelta(seconds=3)).isoformat()
    return jsonvalues.dumps(body).encode()


async def test_resent_v0_bodies_and_restamped_retries_leave_a_ledger_verify_finds_clean(
    kafka_bootstrap: str, ledger_url: str, consumers: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(
        TrafficConfig(threads=40, turns_per_thread=3, seed=5, poison_rate=0, start=START)
    )
    v0 = [(k, v) for k, v in records if json.loads(v).get("schema_version") == 0]
    retries = [(k, r) for k, v in records[::7] if (r := _restamped(v)) is not None]
    assert v0 and retries
    await stack.publish(records)
    # A first pass, so that some copies meet stored rows and others meet each other in a batch.
    first = ConsumerProcess(stack.env(LEDGER_MAX_BATCH="7"), tmp_path / "a.log", "--until-idle")
    consumers.append(first.start())
    assert first.wait() == 0, first.logs()
    # The v0 bodies re-sent now carry a later record timestamp, hence a later occurred_at.
    await stack.publish(retries + v0 + retries[:5])
    second = ConsumerProcess(stack.env(LEDGER_MAX_BATCH="13"), tmp_path / "b.log", "--until-idle")
    consumers.append(second.start())
    assert second.wait() == 0, second.logs()
    assert await stack.end_offsets(stack.dlq_topic) == {0: 0}  # copies are not poison

    verified = stack.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert (await ledger_summary(stack))["threads"] == 40
