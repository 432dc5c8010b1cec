"""What a group remembers by position (`applied_records`, `dead_lettered`) is forgotten below
each partition's log start, and only there, and only its own rows (another group may read a
topic of that name on another cluster), by index ranges; a role that may not delete keeps the
rows and says so once; a running consumer does it on its own."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

import consumer.ledger.forgetting
from consumer.kafka.log_start import LogStartWatch
from consumer.ledger.database import asyncpg_dsn, create_pool
from consumer.ledger.forgetting import Forgotten
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from tests.factories import START
from tests.integration.harness import ConsumerProcess, Stack, wait_for

GROUPS = ("g1", "g2")
BLOCKS = (0, 64, 128, 192, 256)  # partition 0's applied_records rows, per group
LETTERS = (5, 199, 200, 250)  # partition 0's dead_lettered offsets, per group
LOG_START = 200  # of partition 0; partition 1's stays 0


async def _publish(stack: Stack, per_partition: dict[int, int]) -> None:
    await stack.create_topic()
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        for partition, count in per_partition.items():
            for _ in range(count):
                await producer.send(stack.topic, b"x", partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def _delete_below(stack: Stack, partition: int, offset: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        await admin.delete_records(
            {TopicPartition(stack.topic, partition): RecordsToDelete(offset)}
        )
    finally:
        await admin.close()


@pytest.fixture
async def assigned(
    kafka_bootstrap: str, ledger_url: str
) -> AsyncIterator[tuple[Stack, AIOKafkaConsumer]]:
    """A two-partition topic with 300 records on partition 0 (the first LOG_START deleted) and
    10 on partition 1, and a consumer assigned both."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=2)
    await _publish(stack, {0: 300, 1: 10})
    await _delete_below(stack, 0, LOG_START)
    kafka = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await kafka.start()
    kafka.assign([TopicPartition(stack.topic, 0), TopicPartition(stack.topic, 1)])
    try:
        yield stack, kafka
    finally:
        await kafka.stop()


async def _remembered(conn: asyncpg.Connection, topic: str) -> None:
    """Every group's rows at BLOCKS and LETTERS on partitions 0 and 1."""
    for group in GROUPS:
        for partition in (0, 1):
            await conn.executemany(
                "INSERT INTO applied_records (group_id, topic, partition, first_offset, entries)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(group, topic, partition, block, bytes(16)) for block in BLOCKS],
            )
            await conn.executemany(
                'INSERT INTO dead_lettered (group_id, topic, partition, "offset", reason,'
                " value_digest) VALUES ($1, $2, $3, $4, 'invalid_json', $5)",
                [(group, topic, partition, offset, bytes(32)) for offset in LETTERS],
            )


async def _positions(
    conn: asyncpg.Connection, table: str, column: str
) -> set[tuple[str, str, int, int]]:
    rows = await conn.fetch(f"SELECT group_id, topic, partition, {column} AS at FROM {table}")
    return {(r["group_id"], r["topic"], r["partition"], r["at"]) for r in rows}


async def test_a_group_forgets_its_own_rows_wholly_below_the_log_start(
    assigned: tuple[Stack, AIOKafkaConsumer],
    ledger: asyncpg.Connection,
    ledger_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, kafka = assigned
    other_topic = f"{stack.topic}.other"  # its rows stay: another topic's log start is its own
    await _remembered(ledger, stack.topic)
    await _remembered(ledger, other_topic)
    # A few rows a statement, so that forgetting takes several (as years of rows would).
    monkeypatch.setattr(consumer.ledger.forgetting, "ROWS_PER_STATEMENT", 4)
    pool = await create_pool(ledger_url)
    try:
        watch = LogStartWatch(kafka, pool, "g1", stack.topic)
        # Blocks 0, 64 and 128 end at or below 200; block 192 holds 200..255. Offsets 5, 199.
        assert await watch.forget() == Forgotten(applied_rows=3, dead_lettered=2)
        assert await watch.forget() == Forgotten(0, 0)
    finally:
        await pool.close()

    def rows(
        topic: str, partition: int, at: tuple[int, ...], groups: tuple[str, ...] = GROUPS
    ) -> set[tuple[str, str, int, int]]:
        return {(group, topic, partition, a) for group in groups for a in at}

    for table, column, at, kept in (
        ("applied_records", "first_offset", BLOCKS, (192, 256)),
        ("dead_lettered", '"offset"', LETTERS, (200, 250)),
    ):
        untouched = {
            *rows(other_topic, 0, at),
            *rows(other_topic, 1, at),
            *rows(stack.topic, 1, at),
            *rows(stack.topic, 0, at, ("g2",)),
        }
        assert await _positions(ledger, table, column) == {
            *untouched,
            *rows(stack.topic, 0, kept, ("g1",)),
        }


async def test_a_role_that_may_not_delete_keeps_the_rows_and_says_so_once(
    assigned: tuple[Stack, AIOKafkaConsumer],
    ledger: asyncpg.Connection,
    ledger_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack, kafka = assigned
    await _remembered(ledger, stack.topic)
    role, password = f"nodelete_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await ledger.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    await ledger.execute(
        f"GRANT SELECT, INSERT, UPDATE ON applied_records, dead_lettered TO {role}"
    )
    scheme, _, rest = ledger_url.partition("://")
    pool = await create_pool(f"{scheme}://{role}:{password}@{rest.partition('@')[2]}")
    try:
        watch = LogStartWatch(kafka, pool, "g1", stack.topic)
        with caplog.at_level(logging.INFO, logger="consumer.kafka.log_start"):
            assert await watch.forget() is None
            assert await watch.forget() is None
    finally:
        await pool.close()
        await ledger.execute(f"DROP OWNED BY {role}")
        await ledger.execute(f"DROP ROLE {role}")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "grant DELETE" in said[0]
    assert await ledger.fetchval("SELECT count(*) FROM applied_records") == 2 * 2 * len(BLOCKS)


async def test_a_running_consumer_forgets_on_its_own(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """Records applied and dead-lettered, then the log start moved past them: the consumer's
    first pass (10 s after its start) forgets them."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    junk = [(b"j", b"not an event %d" % i) for i in range(70)]
    records, _ = plan_traffic(
        TrafficConfig(threads=20, turns_per_thread=3, seed=42, poison_rate=0, start=START)
    )
    await stack.publish(junk + records)
    drain = ConsumerProcess(stack.env(), tmp_path / "drain.log", "--until-idle").start()
    processes.append(drain)
    assert drain.wait() == 0, drain.logs()
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM dead_lettered") == len(junk)
        blocks_before = await conn.fetchval("SELECT count(*) FROM applied_records")
        await _delete_below(stack, 0, 128)  # the junk (0..69) and the block at 64

        running = ConsumerProcess(stack.env(), tmp_path / "running.log").start()
        processes.append(running)

        async def forgot() -> bool:
            return "forgot positions below the log start" in running.logs()

        await wait_for(forgot, within=60, what="the first pass", context=running.logs)
        assert await conn.fetchval("SELECT count(*) FROM dead_lettered") == 0
        # Block 0 held junk only (nothing applied there, no row); block 64 goes.
        assert (
            await conn.fetchval("SELECT count(*) FROM applied_records WHERE first_offset < 128")
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM applied_records") == blocks_before - 1
        line = next(json.loads(x) for x in running.logs().splitlines() if "forgot positions" in x)
        assert (line["applied_rows"], line["dead_lettered"]) == (1, len(junk))
    finally:
        await conn.close()


@pytest.mark.parametrize("plans", ["force_custom_plan", "force_generic_plan"])
async def test_forgetting_reads_index_ranges_not_the_tables(
    ledger: asyncpg.Connection, plans: str
) -> None:
    """Among 40,000 rows of other groups and topics and 20,000 of the group's own above the
    log start, each statement finds its rows by primary-key ranges and deletes them by ctid:
    no sequential scan, whatever the plan cache chooses."""
    for table, position in (("applied_records", "first_offset"), ("dead_lettered", '"offset"')):
        value = "'\\x00'::bytea" if table == "applied_records" else "'r', '\\x00'::bytea"
        columns = "entries" if table == "applied_records" else "reason, value_digest"
        await ledger.execute(
            f"INSERT INTO {table} (group_id, topic, partition, {position}, {columns})"
            f" SELECT g, t, p, o * 64, {value}"
            " FROM unnest(ARRAY['g1', 'g2']) AS g, unnest(ARRAY['t', 'u']) AS t,"
            " generate_series(0, 1) AS p, generate_series(0, 9999) AS o"
            " WHERE (g, t) <> ('g2', 'u')"
        )
        await ledger.execute(f"ANALYZE {table}")
    await ledger.execute(f"SET plan_cache_mode = {plans}")
    statements = (
        consumer.ledger.forgetting._FORGET_APPLIED,
        consumer.ledger.forgetting._FORGET_DEAD_LETTERED,
    )
    for statement in statements:
        await ledger.execute(f"PREPARE forget(text, text, int[], bigint[], int) AS {statement}")
        for _ in range(6):  # the plan cache settles on a generic plan after five executions
            plan = await ledger.fetchval(
                "EXPLAIN (FORMAT JSON) EXECUTE forget('g1', 't', '{0,1}', '{6400,0}', 100)"
            )
            nodes = json.dumps(plan)
            assert "Seq Scan" not in nodes, nodes
            assert "Tid Scan" in nodes and "Index" in nodes, nodes
        await ledger.execute("DEALLOCATE forget")
