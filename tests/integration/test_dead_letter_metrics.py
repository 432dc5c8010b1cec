"""events_total{type, outcome="dead_lettered"}: a record that could not be decoded is counted
under the event type its JSON names, when it names one of ours; `unknown` only otherwise."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from tests.examples import example
from tests.integration.harness import ConsumerProcess, Stack, wait_for


def _body(name: str, **changes: object) -> bytes:
    return json.dumps({**example(name), **changes}).encode()


async def test_dead_letters_are_counted_under_the_type_they_name(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    await stack.publish(
        [
            (b"1", _body("turn.finalized", content=[{"type": 1}])),  # schema_invalid
            (b"1", _body("turn.finalized", usage={"calls": "many"})),  # schema_invalid
            (b"1", _body("message.appended", schema_version=7)),  # unsupported_version
            (b"1", _body("turn.started", type="turn.exploded")),  # unknown_type
            (b"1", b"{not json"),  # invalid_json
            (b"1", json.dumps(example("turn.started")).encode()),  # applied
        ]
    )
    consumer = ConsumerProcess(stack.env(), tmp_path / "c.log").start()
    counted: dict[tuple[str, str], float] = {}

    async def all_counted() -> bool:  # metrics move after the commit: poll them, not offsets
        status, metrics = await asyncio.to_thread(consumer.http, "/metrics")
        counted.clear()
        for line in metrics.splitlines() if status == 200 else []:
            if line.startswith("token_ledger_events_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                counted[labels["type"], labels["outcome"]] = float(line.rsplit(" ", 1)[1])
        return sum(counted.values()) == 6

    try:
        await wait_for(all_counted, within=90, what="six events counted", context=consumer.logs)
    finally:
        consumer.stop_quietly()
    assert counted == {
        ("turn.finalized", "dead_lettered"): 2.0,
        ("message.appended", "dead_lettered"): 1.0,
        ("unknown", "dead_lettered"): 2.0,  # unknown_type and invalid_json name none of ours
        ("turn.started", "applied"): 1.0,
    }
