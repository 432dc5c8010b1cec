"""Paths on which a record could be skipped (the stored offset moving past it, never applied
nor dead-lettered) or a partition stall: a batch committed in halves whose first half is fenced
or stops a partition, and an offset reset that another owner's move fences.

Each test runs a real pipeline in-process against the real broker and database; a fault is
injected at the seams open_pipeline offers (the batch transaction, the opening of assigned
partitions) where the real cause (statement_timeout, another owner, the dead-letter topic)
would raise the same error.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from consumer.errors import DeadLetterRefusedError, TransientError
from consumer.http.metrics import LedgerMetrics
from consumer.kafka.assembly import open_pipeline
from consumer.kafka.dead_letters import HEADER_HEADROOM
from consumer.kafka.pipeline import Pipeline
from consumer.kafka.topics import prepare_topics
from consumer.ledger.batch import Applied, Decoded, commit_batch
from consumer.ledger.database import create_pool
from consumer.retry import Backoff
from consumer.settings import load_settings
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from consumer.status import Readiness
from tests.factories import START
from tests.integration.harness import Stack, expected_summary, ledger_summary

Hook = Callable[[Pipeline, list[Any]], Awaitable[None]]


def _statement_timeout() -> TransientError:
    # What classify_database_error makes of asyncpg's QueryCanceledError (SQLSTATE 57014).
    return TransientError("SQLSTATE 57014 QueryCanceledError", sqlstate="57014", timed_out=True)


async def _send(stack: Stack, records: list[tuple[bytes, bytes]], *, partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(stack.topic, value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def _set_stored(stack: Stack, partition: int, offset: int) -> None:
    """Another owner (`token-ledger replay`, a zombie consumer) moves a stored offset."""
    conn = await stack.connect()
    try:
        await conn.execute(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at)"
            " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (group_id, topic, partition)"
            " DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
            stack.group_id,
            stack.topic,
            partition,
            offset,
        )
    finally:
        await conn.close()


async def _run(
    stack: Stack,
    *,
    within: float = 90,
    before_commit: Hook | None = None,
    after_open: Callable[[Pipeline], Awaitable[None]] | None = None,
    **settings_overrides: Any,
) -> Pipeline:
    """Run a Faulty pipeline with --until-idle semantics; TimeoutError if it never gets there."""
    settings = load_settings(
        kafka_bootstrap=stack.bootstrap,
        database_url=stack.database_url,
        topic=stack.topic,
        dlq_topic=stack.dlq_topic,
        group_id=stack.group_id,
        **settings_overrides,
    )
    limits = await prepare_topics(settings)
    pool = await create_pool(stack.database_url)
    real_commit = functools.partial(commit_batch, pool, settings.group_id, settings.topic)

    async def commit(moves: Any, decoded: Decoded, report: Any) -> Applied:
        # A fault the database, another owner or the dead-letter topic would raise here.
        if before_commit is not None:
            await before_commit(pipeline, list(decoded.records))
        return await real_commit(moves, decoded, report)

    try:
        async with open_pipeline(
            settings,
            pool,
            LedgerMetrics(),
            Readiness(600),
            fetch_bytes=limits.source_max_bytes + HEADER_HEADROOM,
            backoff=Backoff(initial=0.05, maximum=0.5),
            commit=commit,
        ) as pipeline:
            if after_open is not None:
                open_pending = pipeline.checkpoints.open_pending
                hooks = [after_open]

                async def opened() -> None:  # once the assigned partitions are sought
                    await open_pending()
                    if hooks and not pipeline.checkpoints.opening:
                        await hooks.pop()(pipeline)

                pipeline.checkpoints.open_pending = opened  # type: ignore[method-assign]
            async with asyncio.timeout(within):
                await pipeline.run(until_idle=True)
    finally:
        await pool.close()
    return pipeline


async def test_a_fence_in_the_first_half_of_a_halved_batch_skips_nothing(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=2)
    records, expect = plan_traffic(
        TrafficConfig(threads=10, turns_per_thread=2, seed=21, poison_rate=0, start=START)
    )
    # Sorted by (partition, offset), the middle of the batch falls inside partition 0: all of
    # partition 1 is in the second half. One record of partition 1 is held back.
    cut = len(records) * 3 // 5
    first, second, late = records[:cut], records[cut:-1], records[-1]
    await stack.create_topic()
    await _send(stack, first, partition=0)
    await _send(stack, second, partition=1)
    state = {"timeouts": 0, "fenced": False}

    async def before_commit(pipeline: Pipeline, batch: list[Any]) -> None:
        partitions = {r.partition for r in batch}
        if state["timeouts"] < 2 and partitions == {0, 1}:
            state["timeouts"] += 1  # the whole batch hits statement_timeout twice: halves
            raise _statement_timeout()
        if state["timeouts"] == 2 and not state["fenced"] and partitions == {0}:
            state["fenced"] = True
            # Meanwhile `token-ledger replay` rewinds partition 0 (or a zombie owns it): the
            # first half is fenced. And one more record lands on partition 1.
            await _set_stored(stack, 0, 0)
            await _send(stack, [late], partition=1)

    await _run(stack, before_commit=before_commit, max_batch=1000)
    assert state == {"timeouts": 2, "fenced": True}, state  # the faults happened as scripted
    assert await stack.stored_offsets() == {0: len(first), 1: len(second) + 1}
    # Every record of partition 1 must be in the ledger: the stored offset says so.
    assert await ledger_summary(stack) == expected_summary(expect)


async def test_a_dead_letter_refused_in_the_first_half_keeps_the_partition_where_it_stands(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, _ = plan_traffic(
        TrafficConfig(threads=6, turns_per_thread=2, seed=22, poison_rate=0, start=START)
    )
    await stack.create_topic()
    await _send(stack, records, partition=0)
    state = {"timeouts": 0, "refused": False}

    async def before_commit(pipeline: Pipeline, batch: list[Any]) -> None:
        if state["timeouts"] < 2 and len(batch) == len(records):
            state["timeouts"] += 1
            raise _statement_timeout()
        if state["timeouts"] == 2 and not state["refused"] and batch[0].offset == 0:
            state["refused"] = True
            # Step 2c: a record the merge rejected (event_id_conflict, SQLSTATE 23) is
            # dead-lettered inside the transaction and the dead-letter topic refuses it for
            # good (RecordTooLargeError after an operator shrank max.message.bytes, an ACL).
            raise DeadLetterRefusedError([0], "RecordTooLargeError")

    pipeline = await _run(stack, before_commit=before_commit, max_batch=1000)
    assert state == {"timeouts": 2, "refused": True}, state
    assert 0 in pipeline.readiness.halted, pipeline.readiness.halted
    # "partition 0 stands before the record it cannot dead-letter" (docs/operations.md#stopped-partitions)
    assert (await stack.stored_offsets()).get(0) in (None, 0), await stack.stored_offsets()


async def test_an_offset_reset_that_is_fenced_follows_the_stored_offset(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, expect = plan_traffic(
        TrafficConfig(threads=6, turns_per_thread=2, seed=23, poison_rate=0, start=START)
    )
    await stack.create_topic()
    await _send(stack, records, partition=0)
    await _set_stored(stack, 0, 10_000)  # beyond the end (a recreated topic)

    async def after_open(pipeline: Pipeline) -> None:
        # The operator fixes it (`token-ledger replay --to-offset 0`) as the consumer seeks.
        await _set_stored(stack, 0, 0)

    await _run(stack, within=45, after_open=after_open, offset_reset="earliest")
    assert await stack.stored_offsets() == {0: len(records)}
    assert await ledger_summary(stack) == expected_summary(expect)
