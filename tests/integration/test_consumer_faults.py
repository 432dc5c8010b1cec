"""Faults around the consumer: the database going away, two owners of one partition, replay
and verify."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer.http.metrics import LedgerMetrics
from consumer.kafka.assembly import open_pipeline, source_consumer
from consumer.kafka.dead_letters import HEADER_HEADROOM
from consumer.kafka.topics import prepare_topics
from consumer.ledger.database import create_pool
from consumer.ledger.migrate import upgrade
from consumer.settings import load_settings
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from consumer.status import Readiness
from devstack.postgres import PostgresServer
from devstack.processes import free_port
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    expected_summary,
    ledger_summary,
    wait_for,
)


@pytest.fixture
async def own_postgres() -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own, so that it can be stopped and started again."""
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-pg-fault-"))
    server = PostgresServer(workdir, port=free_port())
    server.start()
    await asyncio.to_thread(upgrade, server.url)
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


async def _mirrored(stack: Stack) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(stack.group_id)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


async def test_database_outage_moves_nothing_and_everything_lands_after(
    kafka_bootstrap: str,
    own_postgres: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    records, expect = plan_traffic(
        TrafficConfig(threads=80, turns_per_thread=4, seed=12, poison_rate=0, start=START)
    )
    half = len(records) // 2
    await stack.publish(records[:half])
    consumer = ConsumerProcess(stack.env(LEDGER_STALL_SECONDS="600"), tmp_path / "c.log").start()
    processes.append(consumer)
    await wait_for(stack.caught_up, within=60, what="first half applied", context=consumer.logs)
    await wait_for(lambda: _status_is(consumer, 200), within=30, what="ready")
    before = await _mirrored(stack)

    await asyncio.to_thread(own_postgres.stop)
    await stack.publish(records[half:])
    await wait_for(lambda: _status_is(consumer, 503), within=30, what="not ready")
    await wait_for(lambda: _retries(consumer, 3), within=60, what="several retries")
    assert "database unreachable" in consumer.http("/readyz")[1]
    assert await _mirrored(stack) == before  # no offset moved
    assert await stack.dead_letters() == []  # nothing dead-lettered because the database is down

    await asyncio.to_thread(own_postgres.start)
    await wait_for(stack.caught_up, within=90, what="the rest to land", context=consumer.logs)
    await wait_for(lambda: _status_is(consumer, 200), within=30, what="ready again")
    assert await ledger_summary(stack) == expected_summary(expect)
    assert await stack.dead_letters() == []
    # The outage is two lines in the log (it began, it ended), not one per retry.
    assert consumer.logs().count('"database unreachable"') == 1, consumer.logs()
    assert consumer.logs().count('"database reachable again"') == 1


async def test_sigterm_while_the_database_is_down_exits_0_within_10s(
    kafka_bootstrap: str,
    own_postgres: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    records, expect = plan_traffic(
        TrafficConfig(threads=40, turns_per_thread=4, seed=15, poison_rate=0, start=START)
    )
    await stack.create_topic()
    consumer = ConsumerProcess(stack.env(), tmp_path / "c.log").start()
    processes.append(consumer)
    await wait_for(lambda: _status_is(consumer, 200), within=30, what="ready")
    await asyncio.to_thread(own_postgres.stop)
    await stack.publish(records)
    await wait_for(
        lambda: _retries(consumer, 2), within=60, what="retries while the database is down"
    )
    code, seconds = consumer.terminate()  # the batch in flight cannot commit: it is abandoned
    assert code == 0, consumer.logs()
    assert seconds < 10
    assert '"batch abandoned"' in consumer.logs()

    await asyncio.to_thread(own_postgres.start)
    after = ConsumerProcess(stack.env(), tmp_path / "after.log", "--until-idle").start()
    processes.append(after)
    assert after.wait() == 0, after.logs()
    assert await ledger_summary(stack) == expected_summary(expect)


async def _status_is(consumer: ConsumerProcess, status: int) -> bool:
    return await consumer.status("/readyz") == status


async def _retries(consumer: ConsumerProcess, at_least: int) -> bool:
    _, metrics = await asyncio.to_thread(consumer.http, "/metrics")
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("token_ledger_db_retries_total{")
    )
    return counted >= at_least


async def _run_pipeline(stack: Stack, kafka_group: str) -> LedgerMetrics:
    """A full pipeline in-process, in its own Kafka group, sharing the ledger's offsets."""
    settings = load_settings(
        kafka_bootstrap=stack.bootstrap,
        database_url=stack.database_url,
        topic=stack.topic,
        dlq_topic=stack.dlq_topic,
        group_id=stack.group_id,
        max_batch=50,
    )
    limits = await prepare_topics(settings)
    metrics = LedgerMetrics()
    pool = await create_pool(stack.database_url)
    try:
        async with open_pipeline(
            settings,
            pool,
            metrics,
            Readiness(600),
            fetch_bytes=limits.source_max_bytes + HEADER_HEADROOM,
            group_id=kafka_group,
        ) as pipeline:
            await pipeline.run(until_idle=True)
    finally:
        await pool.close()
    return metrics


async def test_two_owners_of_one_partition_range_one_commits_the_other_is_fenced(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, expect = plan_traffic(
        TrafficConfig(threads=60, turns_per_thread=4, seed=13, poison_rate=0, start=START)
    )
    await stack.publish(records)
    # Two Kafka groups, so both are assigned the partition: a zombie and a new owner at once.
    results = await asyncio.gather(_run_pipeline(stack, "owner-a"), _run_pipeline(stack, "owner-b"))
    fenced = sum(
        m.registry.get_sample_value("token_ledger_fenced_batches_total") or 0 for m in results
    )
    committed = sum(
        m.registry.get_sample_value("token_ledger_batch_size_sum") or 0 for m in results
    )
    assert fenced >= 1
    assert committed == len(records)  # every range committed exactly once, by one of them
    assert await stack.stored_offsets() == {0: len(records)}
    assert await ledger_summary(stack) == expected_summary(expect)


async def _dump(stack: Stack) -> dict[str, list[Any]]:
    conn: asyncpg.Connection = await stack.connect()
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")]
            for table in ("chat_threads", "chat_messages", "token_usage")
        }
    finally:
        await conn.close()


async def test_replay_leaves_the_ledger_byte_identical_and_verify_finds_corruption(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    before_publish = datetime.now(UTC)
    records, _ = plan_traffic(TrafficConfig(threads=40, turns_per_thread=4, seed=14, start=START))
    await stack.publish(records)
    first = ConsumerProcess(stack.env(), tmp_path / "first.log", "--until-idle").start()
    processes.append(first)
    assert first.wait() == 0, first.logs()
    clean = await _dump(stack)
    assert stack.cli("verify").returncode == 0

    rewound = stack.cli("replay", "--from-time", before_publish.isoformat())
    assert rewound.returncode == 0, rewound.stderr
    assert "-> 0" in rewound.stdout
    assert sum((await stack.stored_offsets()).values()) == 0
    again = ConsumerProcess(stack.env(), tmp_path / "again.log", "--until-idle").start()
    processes.append(again)
    assert again.wait() == 0, again.logs()
    assert await stack.caught_up()
    assert await _dump(stack) == clean  # ids, contents and even updated_at unchanged

    verified = stack.cli("verify")
    assert verified.returncode == 0, verified.stdout
    assert "ledger matches the topic" in verified.stdout

    conn = await stack.connect()
    try:
        await conn.execute(
            "UPDATE token_usage SET cost_micros = cost_micros + 1"
            " WHERE id = (SELECT min(id) FROM token_usage)"
        )
    finally:
        await conn.close()
    corrupted = stack.cli("verify")
    assert corrupted.returncode == 1
    assert "token_usage" in corrupted.stdout
    assert "differs in cost_micros" in corrupted.stdout


async def test_consumer_started_while_the_database_is_down_waits_for_it(
    kafka_bootstrap: str,
    own_postgres: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    records, expect = plan_traffic(
        TrafficConfig(threads=30, turns_per_thread=3, seed=16, poison_rate=0, start=START)
    )
    await stack.publish(records)
    await asyncio.to_thread(own_postgres.stop)
    consumer = ConsumerProcess(stack.env(), tmp_path / "c.log").start()
    processes.append(consumer)
    await wait_for(lambda: _healthz(consumer), within=60, what="alive", context=consumer.logs)
    await wait_for(lambda: _status_is(consumer, 503), within=30, what="not ready")
    assert "database unreachable" in consumer.http("/readyz")[1]
    assert await stack.dead_letters() == []

    await asyncio.to_thread(own_postgres.start)
    await wait_for(stack.caught_up, within=90, what="everything to land", context=consumer.logs)
    assert await ledger_summary(stack) == expected_summary(expect)


async def _healthz(consumer: ConsumerProcess) -> bool:
    return await consumer.status("/healthz") == 200


async def _group_state(stack: Stack) -> tuple[str, int]:
    """The consumer group's state and member count, as the broker sees them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([stack.group_id])
    finally:
        await admin.close()
    _, _, state, _, _, members, *_ = response.groups[0]
    return state, len(members)


async def test_a_database_away_during_a_rebalance_does_not_hold_the_group(
    kafka_bootstrap: str,
    own_postgres: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    """aiokafka awaits the assignment listener inside the group join: if it waited there for
    the stored offsets while the database is away, the next rebalance could not complete (and
    past the rebalance timeout this member would be evicted). The offsets are loaded by the
    run loop instead, the partitions paused until then."""
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    records, expect = plan_traffic(
        TrafficConfig(threads=40, turns_per_thread=4, seed=16, poison_rate=0, start=START)
    )
    await stack.create_topic()
    consumer = ConsumerProcess(stack.env(), tmp_path / "c.log").start()
    processes.append(consumer)
    await wait_for(lambda: _status_is(consumer, 200), within=30, what="ready")
    await asyncio.to_thread(own_postgres.stop)

    async def stable_with(members: int) -> bool:
        return await _group_state(stack) == ("Stable", members)

    # A second member joins and leaves: two rebalances while the database is away.
    visitor = source_consumer(
        load_settings(
            kafka_bootstrap=stack.bootstrap,
            database_url=stack.database_url,
            topic=stack.topic,
            group_id=stack.group_id,
        ),
        1024 * 1024,
    )
    visitor.subscribe([stack.topic])
    await visitor.start()
    try:
        await wait_for(lambda: stable_with(2), within=30, what="the visitor joined")
    finally:
        await visitor.stop()
    await wait_for(lambda: stable_with(1), within=30, what="the group settled without the visitor")
    assert consumer.process is not None and consumer.process.poll() is None

    await stack.publish(records)
    await asyncio.to_thread(own_postgres.start)
    await wait_for(stack.caught_up, within=90, what="every record applied", context=consumer.logs)
    assert await ledger_summary(stack) == expected_summary(expect)
