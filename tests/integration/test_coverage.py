"""What the operator sees is true: `verify` says how far it compared (and counts, in records,
what the consumers have not applied yet), `status` shows where each partition stands and
which are stopped, and `replay` moves the group's offsets in Kafka too
(docs/operations.md#verify-coverage, docs/operations.md#status)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.failures import ExitCode
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from tests.factories import START
from tests.integration.harness import ConsumerProcess, Stack, said, wait_for


async def _drained(stack: Stack, seed: int = 61) -> None:
    records, _ = plan_traffic(
        TrafficConfig(threads=12, turns_per_thread=2, seed=seed, poison_rate=0, start=START)
    )
    await stack.publish(records)
    drained = await asyncio.to_thread(stack.cli, "consume", "--until-idle")
    assert drained.returncode == 0, drained.stderr


async def _published_in_a_transaction(stack: Stack, seed: int) -> Counter[int]:
    """More records, committed in one Kafka transaction (its commit markers take an offset
    per partition, so offsets overstate the records); how many went to each partition."""
    records, _ = plan_traffic(
        TrafficConfig(threads=5, turns_per_thread=2, seed=seed, poison_rate=0, start=START)
    )
    async with stack.transactional_producer("later") as producer:
        await producer.begin_transaction()
        sent = [await producer.send(stack.topic, value, key=key) for key, value in records]
        placed = await asyncio.gather(*sent)
        await producer.commit_transaction()
    return Counter(meta.partition for meta in placed)


def _json(run: Any) -> dict[str, Any]:
    out = run.stdout.strip().splitlines()
    assert len(out) == 1, run.stdout
    parsed: dict[str, Any] = json.loads(out[0])
    return parsed


async def test_verify_counts_the_records_past_the_applied_offsets_exactly(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _drained(stack)
    applied = await stack.stored_offsets()
    later = await _published_in_a_transaction(stack, seed=62)
    ends = await stack.end_offsets()
    assert any(ends[p] - applied[p] > later[p] for p in later)  # the markers take offsets

    run = await asyncio.to_thread(stack.cli, "verify", "--format", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = _json(run)
    assert report["ok"] is True
    assert report["differences"] == 0
    assert report["expected"] == report["actual"]
    assert report["not_applied"] == sum(later.values())
    assert report["partitions"] == [
        {
            "partition": p,
            "compared_up_to": applied[p],
            "log_end": ends[p],
            "not_applied": later[p],
        }
        for p in range(stack.partitions)
    ]
    assert "up to the applied offsets" in report["verdict"]

    table = await asyncio.to_thread(stack.cli, "verify")
    assert table.returncode == 0, table.stdout + table.stderr
    behind = ", ".join(f"partition {p}: {n}" for p, n in sorted(later.items()) if n)
    assert table.stdout.strip().splitlines()[-1] == (
        "ledger matches the topic up to the applied offsets;"
        f" {sum(later.values())} record(s) not applied yet ({behind})"
    )

    # Once applied, the comparison covers the whole topic.
    assert (await asyncio.to_thread(stack.cli, "consume", "--until-idle")).returncode == 0
    full = await asyncio.to_thread(stack.cli, "verify")
    assert full.returncode == 0, full.stdout + full.stderr
    assert full.stdout.strip().splitlines()[-1] == "ledger matches the topic"


async def test_verify_of_a_group_without_offsets_is_one_line_not_differences(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    empty = await asyncio.to_thread(stack.cli, "verify")  # migrated, nothing consumed, no record
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert empty.stdout.strip().splitlines()[-1].startswith("nothing to compare")

    # Records, and no consumer applied any yet (none ran, or one is starting): the empty
    # ledger is right so far, and every record is counted as not applied.
    records, _ = plan_traffic(
        TrafficConfig(threads=4, turns_per_thread=2, seed=64, poison_rate=0, start=START)
    )
    await stack.publish(records)
    waiting = await asyncio.to_thread(stack.cli, "verify", "--format", "json")
    assert waiting.returncode == 0, waiting.stdout + waiting.stderr
    report = _json(waiting)
    assert report["not_applied"] == len(records)
    assert [p["compared_up_to"] for p in report["partitions"]] == [0] * stack.partitions
    assert report["verdict"].startswith("ledger matches the topic up to the applied offsets")

    drained = await asyncio.to_thread(stack.cli, "consume", "--until-idle")
    assert drained.returncode == 0, drained.stderr
    for args in (("verify",), ("verify", "--format", "json")):
        run = await asyncio.to_thread(stack.cli, *args, LEDGER_GROUP_ID="token-ledgr")
        assert run.returncode == ExitCode.CONFIGURATION, run.stdout + run.stderr
        assert run.stdout == ""  # no table, no differences
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert said(lines[0]) == (
            f"token-ledger: verify: group 'token-ledgr' has no stored offsets for topic"
            f" '{stack.topic}', so nothing was compared: check LEDGER_GROUP_ID (groups with"
            f" offsets for the topic: '{stack.group_id}') and LEDGER_TOPIC"
        )


async def test_status_shows_offsets_ends_lag_and_stopped_partitions(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _drained(stack)
    stored = await stack.stored_offsets()
    later = await _published_in_a_transaction(stack, seed=63)
    ends = await stack.end_offsets()

    run = await asyncio.to_thread(stack.cli, "status", "--format", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    status = _json(run)
    assert status["ok"] is True
    assert status["group_id"] == stack.group_id
    assert [
        (p["partition"], p["stored_offset"], p["high_watermark"], p["last_stable_offset"])
        for p in status["partitions"]
    ] == [(p, stored[p], ends[p], ends[p]) for p in range(stack.partitions)]
    assert [p["lag"] for p in status["partitions"]] == [
        ends[p] - stored[p] for p in range(stack.partitions)
    ]
    assert sum(p["lag"] for p in status["partitions"]) >= sum(later.values())
    assert not any(p["halted"] for p in status["partitions"])
    assert status["members"] == [] or status["members_error"] is not None  # nobody runs

    table = await asyncio.to_thread(stack.cli, "status")
    assert table.returncode == 0, table.stderr
    assert "partition\tstored\tlog end\tlast stable\tlag\tstopped" in table.stdout
    assert f"1\t{stored[1]}\t{ends[1]}\t{ends[1]}\t{ends[1] - stored[1]}\t-" in table.stdout

    conn = await stack.connect()
    try:
        await conn.execute(
            "INSERT INTO partition_halts (group_id, topic, partition, reason)"
            " VALUES ($1, $2, 2, 'dead letter refused: MessageSizeTooLargeError')",
            stack.group_id,
            stack.topic,
        )
    finally:
        await conn.close()
    halted = await asyncio.to_thread(stack.cli, "status", "--format", "json")
    assert halted.returncode == ExitCode.CHECK_FAILED, halted.stdout + halted.stderr
    partitions = _json(halted)["partitions"]
    assert [p["halt_reason"] for p in partitions] == [
        None,
        None,
        "dead letter refused: MessageSizeTooLargeError",
    ]
    table = await asyncio.to_thread(stack.cli, "status")
    assert table.returncode == ExitCode.CHECK_FAILED
    assert "\tdead letter refused: MessageSizeTooLargeError\n" in table.stdout
    assert "1 partition(s) stopped" in table.stdout

    typo = await asyncio.to_thread(stack.cli, "status", LEDGER_GROUP_ID="token-ledgr")
    assert typo.returncode == ExitCode.CHECK_FAILED
    assert typo.stdout == ""
    assert [said(line) for line in typo.stderr.strip().splitlines()] == [
        f"token-ledger: status: group 'token-ledgr' has no stored offsets for topic"
        f" '{stack.topic}': check LEDGER_GROUP_ID and LEDGER_TOPIC (or no consumer has applied"
        " a record yet)"
    ]


async def test_a_real_halt_is_recorded_for_status_and_cleared_by_the_next_owner(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _drained(stack)
    stored = await stack.stored_offsets()
    conn = await stack.connect()
    try:  # partition 0's stored offset past its log: it stops with LEDGER_OFFSET_RESET=fail
        await conn.execute(
            "UPDATE consumer_offsets SET next_offset = next_offset + 1000"
            " WHERE group_id = $1 AND partition = 0",
            stack.group_id,
        )
        stopped = await asyncio.to_thread(stack.cli, "consume", "--until-idle")
        assert stopped.returncode == 1, stopped.stderr
        rows = await conn.fetch(
            "SELECT partition, reason FROM partition_halts WHERE group_id = $1 AND topic = $2",
            stack.group_id,
            stack.topic,
        )
        assert [r["partition"] for r in rows] == [0]
        assert rows[0]["reason"].startswith("offset out of range: stored offset")

        status = await asyncio.to_thread(stack.cli, "status", "--format", "json")
        assert status.returncode == ExitCode.CHECK_FAILED
        assert [p["halted"] for p in _json(status)["partitions"]] == [True, False, False]

        # Fixed: the next owner judges the partition afresh, and the halt is gone.
        await conn.execute(
            "UPDATE consumer_offsets SET next_offset = $2 WHERE group_id = $1 AND partition = 0",
            stack.group_id,
            stored[0],
        )
        resumed = await asyncio.to_thread(stack.cli, "consume", "--until-idle")
        assert resumed.returncode == 0, resumed.stderr
        assert await conn.fetchval("SELECT count(*) FROM partition_halts") == 0
    finally:
        await conn.close()
    assert (await asyncio.to_thread(stack.cli, "status")).returncode == 0


async def _kafka_offsets(stack: Stack) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(
            stack.group_id,
            partitions=[TopicPartition(stack.topic, p) for p in range(stack.partitions)],
        )
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in found.items()}


async def test_replay_moves_the_groups_offsets_in_kafka(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _drained(stack)
    stored = await stack.stored_offsets()
    assert await _kafka_offsets(stack) == stored  # the consumer's mirror

    run = await asyncio.to_thread(stack.cli, "replay", "--to-offset", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not moved" not in run.stderr
    assert await stack.stored_offsets() == dict.fromkeys(stored, 2)
    assert await _kafka_offsets(stack) == dict.fromkeys(stored, 2)

    dry = await asyncio.to_thread(stack.cli, "replay", "--to-offset", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert await _kafka_offsets(stack) == dict.fromkeys(stored, 2)


async def test_replay_beside_a_running_consumer_says_it_mirrors_them(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _drained(stack)
    stored = await stack.stored_offsets()
    running = ConsumerProcess(stack.env(), tmp_path / "running.log").start()
    processes.append(running)

    async def ready() -> bool:
        return await running.status("/readyz") == 200

    await wait_for(ready, what="the consumer ready", context=running.logs)
    status = _json(await asyncio.to_thread(stack.cli, "status", "--format", "json"))
    assert status["members_error"] is None
    assert [m["partitions"] for m in status["members"]] == [list(range(stack.partitions))]

    run = await asyncio.to_thread(stack.cli, "replay", "--to-offset", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert [said(line) for line in run.stderr.strip().splitlines()] == [
        "token-ledger: the group's offsets in Kafka were not moved: consumers of the group are"
        " running: they mirror the new offsets once they apply them"
    ]

    async def applied_again() -> bool:  # the consumer re-applied the range, and mirrored it
        return await stack.stored_offsets() == stored and await _kafka_offsets(stack) == stored

    await wait_for(applied_again, what="the range applied again", context=running.logs)


async def test_kafkas_group_view_shows_the_stored_offsets_while_a_batch_is_blocked(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _drained(stack)
    stored = await stack.stored_offsets()
    # Kafka's view gone astray (an earlier mirror lost, another tool): from outside the group.
    run = await asyncio.to_thread(stack.cli, "replay", "--to-offset", "0")
    assert run.returncode == 0, run.stderr
    assert await _kafka_offsets(stack) == dict.fromkeys(stored, 0)
    conn = await stack.connect()
    try:
        await conn.execute(
            "UPDATE consumer_offsets SET next_offset = applied_until WHERE group_id = $1",
            stack.group_id,
        )  # the ledger where it was; only Kafka's view is wrong
        locker = conn.transaction()
        await locker.start()
        await conn.execute("LOCK TABLE consumer_offsets IN EXCLUSIVE MODE")  # no batch commits
        await _published_in_a_transaction(stack, seed=62)
        blocked = ConsumerProcess(stack.env(), tmp_path / "blocked.log").start()
        processes.append(blocked)

        async def mirrored() -> bool:
            return await _kafka_offsets(stack) == stored

        await wait_for(
            mirrored, what="the stored offsets mirrored on assignment", context=blocked.logs
        )
        assert await stack.stored_offsets() == stored  # nothing committed meanwhile
        await locker.rollback()
    finally:
        await conn.close()
    await wait_for(stack.caught_up, what="the blocked records", context=blocked.logs)
    assert blocked.terminate()[0] == 0
