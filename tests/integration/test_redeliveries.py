"""Redeliveries cost nothing (docs/design.md#redeliveries): a record the group applied before is
recognised by its fingerprint before it is decoded, and a re-drain of an applied topic writes
only offsets. A different record at an applied position, or the same value with another
timestamp, is decoded and applied; a record the merge rejected is judged again."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka.structs import ConsumerRecord

from consumer.kafka.dead_letters import DeadLetter
from consumer.ledger.applied import BLOCK, applied_before, event_type
from consumer.ledger.batch import Decoding, commit_batch, decode_records
from consumer.ledger.database import asyncpg_dsn, create_pool
from consumer.ledger.offsets import OffsetMove
from consumer.ledger.schema import CONSUMER_TABLES
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from tests.examples import example
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    ledger_summary,
    metric_samples,
    metric_total,
    wait_for,
)

TOPIC = "chat.turn-events"


async def _row_versions(stack: Stack) -> dict[str, set[tuple[str, str]]]:
    """Every row's physical version (ctid, xmin) per table but the offsets: any write to a
    row, even one that changes nothing, gives it a new version."""
    conn = await stack.connect()
    try:
        return {
            table: {
                (str(row["ctid"]), str(row["xmin"]))
                for row in await conn.fetch(f"SELECT ctid, xmin FROM {table}")
            }
            for table in sorted(CONSUMER_TABLES - {"consumer_offsets"})
        }
    finally:
        await conn.close()


async def test_a_redrain_recognises_every_applied_record_and_writes_only_offsets(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    records, _ = plan_traffic(
        TrafficConfig(threads=40, seed=5, duplicate_rate=0.3, poison_rate=0.03, start=START)
    )
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(records)
    consumer = ConsumerProcess(stack.env(LEDGER_MAX_BATCH="50"), tmp_path / "consumer.log")
    processes.append(consumer.start())
    seen: dict[str, float] = {}

    async def committed(count: int) -> bool:
        seen.clear()
        seen.update(await asyncio.to_thread(metric_samples, consumer))
        return metric_total(seen, "token_ledger_batch_size_sum") == count

    await wait_for(lambda: committed(len(records)), what="the topic applied", context=consumer.logs)
    dead_letters = metric_total(seen, "token_ledger_dead_letters_total")
    assert 0 < dead_letters < len(records)
    assert metric_total(seen, "token_ledger_redelivered_records_total") == 0

    async def relayed() -> bool:  # the relay marks what it published: a write of its own
        conn = await stack.connect()
        try:
            return not await conn.fetchval(
                "SELECT count(*) FROM billing_outbox WHERE published_at IS NULL"
            )
        finally:
            await conn.close()

    await wait_for(relayed, what="every revision published", context=consumer.logs)
    before, versions = await ledger_summary(stack), await _row_versions(stack)
    assert versions["applied_records"] and versions["token_usage"]

    rewound = stack.cli("replay", "--to-offset", "0")
    assert rewound.returncode == 0, rewound.stderr
    await wait_for(
        lambda: committed(2 * len(records)), what="the topic applied again", context=consumer.logs
    )
    # Every record applied the first time is recognised, none decoded again: only the dead
    # letters are (and are not sent twice).
    assert (
        metric_total(seen, "token_ledger_redelivered_records_total") == len(records) - dead_letters
    )
    assert metric_total(seen, "token_ledger_dead_letters_total") == dead_letters
    assert await _row_versions(stack) == versions
    assert await ledger_summary(stack) == before


def _record(offset: int, value: bytes, timestamp: int) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, 0, offset, timestamp, 0, b"1", value, None, 1, len(value), [])


async def _ignore_letters(letters: Sequence[DeadLetter]) -> None:
    pass  # dead letters are not these tests' subject


async def _commit(pool: asyncpg.Pool, records: list[ConsumerRecord], expected: int | None) -> Any:
    decoded = decode_records(records, max_bytes=1 << 20, max_future_skew=timedelta(days=3650))
    move = OffsetMove(0, expected, records[-1].offset + 1)
    return await commit_batch(pool, "g", TOPIC, [move], decoded, _ignore_letters)


async def _types(
    pool: asyncpg.Pool, group: str, records: list[ConsumerRecord]
) -> dict[tuple[int, int], str]:
    found = await applied_before(pool, group, TOPIC, records)
    return {position: event_type(stored) for position, stored in found.items()}


async def test_only_the_same_bytes_and_timestamp_at_an_applied_position_are_recognised(
    ledger_url: str,
) -> None:
    started = example("turn.started")
    other = {**started, "event_id": str(uuid.uuid4()), "turn_id": "another"}
    # Its thread in another search space: the merge rejects it (thread_search_space_mismatch).
    conflicting = {
        **started,
        "event_id": str(uuid.uuid4()),
        "turn_id": "moved",
        "search_space_id": started["search_space_id"] + 1,
    }
    timestamp = int(START.timestamp() * 1000)
    first = [
        _record(0, json.dumps(started).encode(), timestamp),
        _record(1, json.dumps(conflicting).encode(), timestamp),
        _record(2, b"{not json", timestamp),
    ]
    pool = await create_pool(ledger_url)
    try:
        applied = await _commit(pool, first, None)
        assert [outcome.value for _, outcome in applied.events] == ["applied", "dead_lettered"]
        again = [
            first[0],
            first[1],
            first[2],
            _record(3, first[0].value, timestamp + 1),  # not applied at this position yet
        ]
        assert await _types(pool, "g", again) == {(0, 0): "turn.started"}
        assert await _types(pool, "another-group", again) == {}
        # The topic recreated: other records at the applied positions, or the same value
        # published at another time (a v0 body takes its occurred_at from it).
        recreated = [
            _record(0, json.dumps(other).encode(), timestamp),
            _record(0, first[0].value, timestamp + 1),
        ]
        for record in recreated:
            assert await _types(pool, "g", [record]) == {}
        await _commit(pool, [_record(3, json.dumps(other).encode(), timestamp)], 3)
        assert await _types(pool, "g", again) == {(0, 0): "turn.started"}
        assert await _types(pool, "g", [_record(3, json.dumps(other).encode(), timestamp)]) == {
            (0, 3): "turn.started"
        }
    finally:
        await pool.close()


async def test_entries_across_blocks_and_applied_again_keep_what_was_stored(
    ledger_url: str,
) -> None:
    started = example("turn.started")
    timestamp = int(START.timestamp() * 1000)

    def value(index: int) -> bytes:
        return json.dumps({**started, "event_id": str(uuid.UUID(int=index + 1))}).encode()

    # 1,100 records from offset 500, in two batches: one row per block of 64 offsets, the
    # block the batches share (1,088-1,151) written by both.
    records = [_record(500 + i, value(i), timestamp) for i in range(1100)]
    pool = await create_pool(ledger_url)
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        await _commit(pool, records[:600], None)
        await _commit(pool, records[600:], 1100)
        found = await applied_before(pool, "g", TOPIC, records)
        assert sorted(found) == [(0, r.offset) for r in records]
        rows = await conn.fetch(
            "SELECT first_offset, length(entries) / 16 AS n FROM applied_records ORDER BY 1"
        )
        assert [r["first_offset"] for r in rows] == list(range(448, 1600, BLOCK))
        assert [r["n"] for r in rows] == [BLOCK] * (len(rows) - 1) + [1600 - 1536]
        # Applied again (records not recognised: say, the lookup failed) into rows that hold
        # more: the rows keep their other entries.
        await conn.execute("UPDATE consumer_offsets SET next_offset = 520")
        await _commit(pool, records[20:30], 520)
        assert sorted(await applied_before(pool, "g", TOPIC, records)) == sorted(found)
    finally:
        await conn.close()
        await pool.close()


async def test_a_replay_applying_records_around_recognised_ones_keeps_their_entries(
    ledger_url: str,
) -> None:
    """docs/operations.md: records dead-lettered as too_large are applied by a replay once
    LEDGER_MAX_EVENT_BYTES is raised. Offsets 2 and 8 are applied then, and 3-7 between them
    are recognised: the block's row keeps 3-7, so the next replay recognises all ten."""
    started = example("turn.started")
    timestamp = int(START.timestamp() * 1000)

    def value(offset: int) -> bytes:
        padding = "x" * (2000 if offset in (2, 8) else 0)
        body = {**started, "event_id": str(uuid.UUID(int=offset + 1)), "user_query": padding}
        return json.dumps(body).encode()

    records = [_record(offset, value(offset), timestamp) for offset in range(10)]

    async def drain(expected: int | None, max_bytes: int) -> None:
        known = await applied_before(pool, "g", TOPIC, records)
        decoding = Decoding(max_bytes=max_bytes, max_future_skew=timedelta(days=3650))
        decoding.add(records, known)
        move = OffsetMove(0, expected, 10)
        await commit_batch(pool, "g", TOPIC, [move], decoding.decoded, _ignore_letters)

    pool = await create_pool(ledger_url)
    try:
        await drain(None, max_bytes=1500)  # 2 and 8: too large
        assert sorted(await applied_before(pool, "g", TOPIC, records)) == [
            (0, offset) for offset in range(10) if offset not in (2, 8)
        ]
        async with pool.acquire() as conn:
            await conn.execute("UPDATE consumer_offsets SET next_offset = 0")
        await drain(0, max_bytes=1 << 20)  # the limit raised, the range replayed
        assert sorted(await applied_before(pool, "g", TOPIC, records)) == [
            (0, offset) for offset in range(10)
        ]
    finally:
        await pool.close()


async def test_a_caught_up_consumers_small_batches_store_little_per_record(ledger_url: str) -> None:
    """One record per batch, as a consumer that keeps up commits them: each batch adds its
    entry to its block's row rather than writing a row of its own, so a record costs its 16
    bytes and a share of one row's overhead. (The table's size on disk moves by pages and
    keeps the space updates free for reuse; over 6,400 such batches it grew by ~16 bytes a
    record.)"""
    started = example("turn.started")
    timestamp = int(START.timestamp() * 1000)
    records = 640
    pool = await create_pool(ledger_url)
    try:
        for offset in range(records):
            value = json.dumps({**started, "event_id": str(uuid.UUID(int=offset + 1))}).encode()
            await _commit(pool, [_record(offset, value, timestamp)], offset or None)
        async with pool.acquire() as conn:
            rows, stored = await conn.fetchrow(
                "SELECT count(*), sum(pg_column_size(a.*)) FROM applied_records AS a"
            )
    finally:
        await pool.close()
    assert rows == records // BLOCK
    assert stored / records <= 18, f"{stored / records:.1f} bytes per record"


async def test_an_entry_of_an_unknown_event_type_is_not_recognised(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """A rolled-back release meets the entries of a later one (docs/operations.md#schema-revisions-and-rolling-deploys): a
    type code it does not know means "decode it", never an error that stops the batch."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    value = json.dumps(example("turn.started")).encode()
    await stack.publish([(b"1", value)])
    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log")
    processes.append(consumer.start())

    async def applied() -> bool:
        return await stack.stored_offsets() == {0: 1}

    await wait_for(applied, what="the record applied", context=consumer.logs)
    conn = await stack.connect()
    try:  # what a later release stored for it: type code 4
        await conn.execute(
            "UPDATE applied_records SET entries = '\\x04'::bytea || substr(entries, 2)"
        )
    finally:
        await conn.close()
    seen: dict[str, float] = {}

    async def committed(count: int) -> bool:
        seen.clear()
        seen.update(await asyncio.to_thread(metric_samples, consumer))
        return metric_total(seen, "token_ledger_batch_size_sum") == count

    assert stack.cli("replay", "--to-offset", "0").returncode == 0
    await wait_for(lambda: committed(2), what="the record read again", context=consumer.logs)
    assert metric_total(seen, "token_ledger_redelivered_records_total") == 0
    assert metric_total(seen, "token_ledger_events_total", 'outcome="duplicate"') == 1
    assert "unexpected error" not in consumer.logs()
