"""Dead letters don't multiply: `dlq replay` replays each source record once however often it
comes back, and an offset `replay` sends (and counts) no dead letter the group already sent."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer.kafka.dead_letters import first_position, source_position
from tests.examples import example
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    ledger_summary,
    metric_samples,
    metric_total,
    wait_for,
)

POISON = [
    (b"1", b"{not json"),  # invalid_json
    (b"2", json.dumps({**example("turn.started"), "type": "turn.exploded"}).encode()),
    (b"3", json.dumps({**example("message.appended"), "schema_version": 7}).encode()),
]
GOOD = [(b"4", json.dumps(example("turn.started")).encode())]


def _until_idle(stack: Stack, processes: list[ConsumerProcess], tmp_path: Path) -> None:
    process = ConsumerProcess(
        stack.env(), tmp_path / f"consumer-{len(processes)}.log", "--until-idle"
    )
    processes.append(process.start())
    assert process.wait() == 0, process.logs()


def _origins(letters: list[Any]) -> list[tuple[int, int]]:
    positions = [first_position(letter) for letter in letters]
    return sorted({(p.partition, p.offset) for p in positions if p is not None})


def _cli_ok(stack: Stack, *args: str) -> str:
    done = stack.cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


async def test_dlq_replays_of_records_that_stay_bad_replay_each_origin_once(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    await stack.publish(POISON + GOOD)
    _until_idle(stack, processes, tmp_path)
    first = await stack.dead_letters()
    assert _origins(first) == [(0, 0), (0, 1), (0, 2)]
    for letter in first:  # the group that sent it, for an operator reading the topic
        assert dict(letter.headers)["ledger.consumer.group"] == stack.group_id.encode()
    between = datetime.now(UTC)  # after every first dead letter, before any copy

    assert "replayed 3 record(s)" in _cli_ok(stack, "dlq", "replay")
    _until_idle(stack, processes, tmp_path)  # still bad: each comes back
    assert len(await stack.dead_letters()) == 6
    second = _cli_ok(stack, "dlq", "replay")
    assert "replayed 3 record(s) (skipped 3 older dead letter(s)" in second
    _until_idle(stack, processes, tmp_path)

    letters = await stack.dead_letters()
    assert len(letters) == 9  # 3 first dead letters, then 3 copies per replay
    assert _origins(letters) == [(0, 0), (0, 1), (0, 2)]
    # Each copy names the original position, and where it was read itself.
    copies = letters[3:]
    assert {dict(c.headers)["ledger.origin.offset"] for c in copies} == {b"0", b"1", b"2"}
    assert sorted(p.offset for c in copies if (p := source_position(c))) == list(range(4, 10))
    planned = _cli_ok(stack, "dlq", "replay", "--dry-run")
    assert "would replay 3 record(s) (skipped 6 older dead letter(s)" in planned
    assert "would replay 3 record(s)\n" in _cli_ok(
        stack, "dlq", "replay", "--dry-run", "--until", between.isoformat()
    )
    assert "would replay 1 record(s) (skipped 2" in _cli_ok(
        stack, "dlq", "replay", "--dry-run", "--reason", "invalid_json"
    )

    # dlq list: json lines, --limit, --since
    listed = stack.cli("dlq", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 9 and "9 dead letter(s)" in listed.stderr
    assert {row["group"] for row in rows} == {stack.group_id}
    assert [row["origin"] for row in rows[:3]] == ["", "", ""]
    assert {row["origin"] for row in rows[3:]} == {f"{stack.topic}[0]@{o}" for o in range(3)}
    assert rows[0] | {"detail": "", "failed_at": ""} == {
        "partition": 0,
        "offset": 0,
        "reason": "invalid_json",
        "detail": "",
        "source": f"{stack.topic}[0]@0",
        "origin": "",
        "group": stack.group_id,
        "failed_at": "",
        "bytes": len(POISON[0][1]),
    }
    limited = stack.cli("dlq", "list", "--format", "json", "--limit", "2")
    assert [json.loads(line)["offset"] for line in limited.stdout.splitlines()] == [0, 1]
    assert "2 of 9 dead letter(s)" in limited.stderr
    since = stack.cli("dlq", "list", "--format", "json", "--since", between.isoformat())
    assert [json.loads(line)["offset"] for line in since.stdout.splitlines()] == list(range(3, 9))
    assert "6 dead letter(s)" in since.stderr
    assert stack.cli("dlq", "list", "--limit", "0").returncode == 2


async def test_an_offset_replay_sends_and_counts_no_dead_letter_twice(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    await stack.publish(GOOD + POISON + GOOD)
    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log").start()
    processes.append(consumer)
    seen: dict[str, float] = {}

    async def committed(records: int) -> bool:
        seen.clear()
        seen.update(await asyncio.to_thread(metric_samples, consumer))
        return metric_total(seen, "token_ledger_batch_size_sum") == records

    await wait_for(lambda: committed(5), what="five records committed", context=consumer.logs)
    assert metric_total(seen, "token_ledger_dead_letters_total") == 3
    assert len(await stack.dead_letters()) == 3
    before = await ledger_summary(stack)

    rewound = stack.cli("replay", "--to-offset", "0")
    assert "partition 0: 5 -> 0" in rewound.stdout, rewound.stderr
    # The running consumer follows the rewind and applies the range again.
    await wait_for(lambda: committed(10), what="the range applied again", context=consumer.logs)
    assert await stack.caught_up()
    # It read the poison again (counted as events) and sent, and counted, no dead letter.
    assert metric_total(seen, "token_ledger_events_total", 'outcome="dead_lettered"') == 6
    assert metric_total(seen, "token_ledger_dead_letters_total") == 3
    letters = await stack.dead_letters()
    assert len(letters) == 3
    assert {dict(x.headers)["ledger.consumer.group"] for x in letters} == {stack.group_id.encode()}
    assert await ledger_summary(stack) == before
    conn = await stack.connect()
    try:
        rows = await conn.fetch(
            'SELECT group_id, topic, partition, "offset", reason FROM dead_lettered'
            ' ORDER BY "offset"'
        )
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [
        (stack.group_id, stack.topic, 0, 1, "invalid_json"),
        (stack.group_id, stack.topic, 0, 2, "unknown_type"),
        (stack.group_id, stack.topic, 0, 3, "unsupported_version"),
    ]
