"""store.py against the real database: offsets compare-and-set, concurrency, statement count,
and a database rejection surfacing as a typed error."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.commands.queries import read_ledger
from consumer.errors import FencedError, PoisonError, classify_database_error
from consumer.ledger.batch import Applied, apply_events, apply_isolating
from consumer.ledger.claims import Outcome
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.merge import reduce_batch
from consumer.ledger.offsets import OffsetMove, advance_offsets, load_offsets
from consumer.ledger.rebuild import expected_rows, rebuild
from consumer.ledger.state import load_state
from consumer.ledger.store import write_plan
from consumer.retry import Backoff, retry_transient
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer.decoding import decode_event
from producer.events import AnyEvent, Rejection, RejectReason
from tests.factories import appended, call, finalized, ledger_events, started
from tests.integration.harness import wait_for

GROUP, TOPIC = "token-ledger", "chat.turn-events"


async def _in_tx(conn: asyncpg.Connection, moves: Sequence[OffsetMove]) -> None:
    async with conn.transaction():
        await advance_offsets(conn, GROUP, TOPIC, moves)


async def test_offsets_advance_only_from_the_expected_position(ledger: asyncpg.Connection) -> None:
    await _in_tx(ledger, [OffsetMove(0, None, 10), OffsetMove(1, None, 5)])
    assert await load_offsets(ledger, GROUP, TOPIC, [0, 1, 2]) == {0: 10, 1: 5}
    await _in_tx(ledger, [OffsetMove(0, 10, 20)])
    with pytest.raises(FencedError) as fenced:
        await _in_tx(ledger, [OffsetMove(0, 10, 30), OffsetMove(1, 5, 6)])
    assert fenced.value.partitions == [0]
    # The whole transaction rolled back: partition 1 did not move either.
    assert await load_offsets(ledger, GROUP, TOPIC, [0, 1]) == {0: 20, 1: 5}
    with pytest.raises(FencedError):
        await _in_tx(ledger, [OffsetMove(1, None, 9)])  # someone already claimed partition 1


async def test_a_fenced_batch_writes_no_rows(ledger: asyncpg.Connection) -> None:
    await _in_tx(ledger, [OffsetMove(0, None, 1)])

    async def stale_batch() -> None:
        async with ledger.transaction():
            await apply_events(
                ledger, ledger_events([started()])
            )  # rows first, to prove they roll back
            await advance_offsets(ledger, GROUP, TOPIC, [OffsetMove(0, 0, 2)])

    with pytest.raises(FencedError):
        await stale_batch()
    assert await ledger.fetchval("SELECT count(*) FROM chat_messages") == 0


async def test_second_owner_of_a_partition_is_fenced_while_first_commits(
    ledger_url: str,
) -> None:
    first = await asyncpg.connect(asyncpg_dsn(ledger_url))
    second = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        await _in_tx(first, [OffsetMove(0, None, 100)])
        tx = first.transaction()
        await tx.start()
        await advance_offsets(first, GROUP, TOPIC, [OffsetMove(0, 100, 200)])
        # The zombie starts from the same stored offset and blocks on the row lock...
        zombie = asyncio.create_task(_in_tx(second, [OffsetMove(0, 100, 150)]))
        await asyncio.sleep(0)  # let it reach the lock before the owner commits
        await tx.commit()
        # ...and once the owner commits, its compare-and-set finds 200, not 100.
        with pytest.raises(FencedError):
            await zombie
        assert await load_offsets(first, GROUP, TOPIC, [0]) == {0: 200}
    finally:
        await first.close()
        await second.close()


def _overlapping_events() -> list[AnyEvent]:
    start = datetime(2026, 11, 20, tzinfo=UTC)
    records, _ = plan_traffic(
        TrafficConfig(threads=30, turns_per_thread=4, seed=11, poison_rate=0, start=start)
    )
    published_ms = int((start + timedelta(days=1)).timestamp() * 1000)
    events = [decode_event(value, timestamp_ms=published_ms) for _, value in records]
    return [e for e in events if not isinstance(e, Rejection)]


async def _writer(url: str, batches: list[list[AnyEvent]]) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for batch in batches:

            async def apply_batch(batch: list[AnyEvent] = batch) -> None:
                async with conn.transaction():
                    await apply_events(conn, ledger_events(batch))

            await retry_transient(apply_batch, Backoff(initial=0.01, maximum=0.2, attempts=50))
    finally:
        await conn.close()


async def test_concurrent_writers_in_opposite_orders_converge(ledger_url: str) -> None:
    events = _overlapping_events()
    rng = random.Random(5)
    forward = [events[i : i + 60] for i in range(0, len(events), 60)]
    backward = [list(reversed(b)) for b in reversed(forward)]
    rng.shuffle(backward)
    await asyncio.gather(_writer(ledger_url, forward), _writer(ledger_url, backward))
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        assert await read_ledger(conn) == expected_rows(rebuild(ledger_events(events)))
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM token_usage GROUP BY message_id ORDER BY 1 DESC LIMIT 1"
            )
            == 1
        )
    finally:
        await conn.close()


class StatementCounter:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, record: Any) -> None:
        self.statements.append(record.query)


async def _count_statements(conn: asyncpg.Connection, events: list[AnyEvent]) -> int:
    await conn.execute("TRUNCATE token_usage, chat_messages, chat_threads")
    counter = StatementCounter()
    conn.add_query_logger(counter)
    try:
        async with conn.transaction():
            await advance_offsets(conn, GROUP, TOPIC, [OffsetMove(0, None, len(events))])
            await apply_events(conn, ledger_events(events))
    finally:
        conn.remove_query_logger(counter)
    await conn.execute("DELETE FROM consumer_offsets")
    return len(
        [s for s in counter.statements if s.strip().rstrip(";").upper() not in ("BEGIN", "COMMIT")]
    )


def _mixed_events(count: int) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    for i in range(count // 5):
        turn, thread = f"{i}:t", 1 + i % 97
        events += [
            started(turn_id=turn, thread_id=thread, space=1),
            finalized(turn_id=turn, thread_id=thread, space=1, calls=[call()]),
            appended(turn_id=turn, thread_id=thread, space=1, cost=5),
            appended(turn_id=None, thread_id=thread, space=1, cost=7),
            appended(turn_id=None, thread_id=thread, space=1, role="user"),
        ]
    return events


async def test_a_batch_costs_a_constant_number_of_statements(ledger: asyncpg.Connection) -> None:
    small, large = _mixed_events(10), _mixed_events(5000)
    assert len(large) == 5000
    await _count_statements(ledger, small)  # asyncpg introspects array types once per connection
    counts = {len(batch): await _count_statements(ledger, batch) for batch in (small, large)}
    # offsets, thread locks, 2 state reads, threads, turn and turn-less messages, the event_id
    # check, the spaces' and the budgets' locks, usage
    assert counts[10] == counts[5000] == 11, counts
    assert await ledger.fetchval("SELECT count(*) FROM token_usage") == 2000


async def test_a_redelivered_batch_writes_no_row(ledger: asyncpg.Connection) -> None:
    """Every record an exact copy of a stored claim: nothing is built, and the transaction
    inserts, updates and deletes no ledger or outbox row (its own statistics say so)."""
    events = ledger_events(_mixed_events(500))
    async with ledger.transaction():
        first = await apply_events(ledger, events)
    tuples = (
        "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_xact_user_tables"
        " WHERE relname IN ('chat_threads', 'chat_messages', 'token_usage', 'billing_outbox')"
    )
    async with ledger.transaction():
        # The session's counts not yet flushed to the statistics may show here: what moves
        # between the two reads is this transaction's.
        before = await ledger.fetchval(tuples)
        plan = await apply_events(ledger, events)
        written = await ledger.fetchval(tuples) - before
    assert (plan.threads, plan.messages, plan.usage, plan.usage_changes) == ([], [], [], [])
    # What won is a duplicate now; what lost (a legacy cost under a finalize) loses again.
    assert plan.outcomes == [
        Outcome.SUPERSEDED if outcome is Outcome.SUPERSEDED else Outcome.DUPLICATE
        for outcome in first.outcomes
    ]
    assert written == 0


async def test_database_rejection_is_classified_as_poison(ledger: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await ledger.execute(
            "INSERT INTO chat_threads (id, search_space_id, created_at, updated_at)"
            " VALUES (-1, 1, now(), now())"
        )
    mapped = classify_database_error(raised.value)
    assert isinstance(mapped, PoisonError)
    assert mapped.sqlstate == "23514"
    assert "ck_chat_threads_id_positive" in str(mapped)


async def test_a_row_value_without_a_form_is_its_records_poison(
    ledger: asyncpg.Connection,
) -> None:
    # The decoders keep such values out; should one slip through (here a lone surrogate in a
    # turn_id), write_plan's arguments refuse it as asyncpg did: a DataError, so the batch
    # isolates the record and dead-letters it, and the rest commits. Not an error that would
    # retry the batch forever.
    good, bad, other = ledger_events(
        [started(turn_id="1:1"), started(turn_id="1:2"), started(turn_id="1:3")]
    )
    bad = msgspec.structs.replace(bad, turn_id="\ud800")
    applied = Applied()
    records = [
        ConsumerRecord(TOPIC, 0, offset, 0, 0, None, b"{}", None, 0, 2, []) for offset in range(3)
    ]
    async with ledger.transaction():
        await apply_isolating(ledger, list(zip([good, bad, other], records, strict=True)), applied)
    assert [(letter.record.offset, letter.reason) for letter in applied.letters] == [
        (1, RejectReason.DATABASE_REJECTED)
    ]
    assert "\ud800" not in applied.letters[0].detail
    assert sorted(await ledger.fetch("SELECT turn_id FROM chat_messages WHERE role = 'user'")) == [
        ("1:1",),
        ("1:3",),
    ]


@pytest.mark.parametrize("stored_before", [True, False], ids=["stored", "new"])
async def test_a_second_writer_of_a_thread_waits_so_the_counters_stay_exact(
    ledger: asyncpg.Connection, ledger_url: str, stored_before: bool
) -> None:
    """A thread's records split over two partitions (e.g. a producer with another partitioner):
    the second writer must not count usage against a stored state that changes under it,
    whether the thread is stored already or neither writer has stored it yet (then no row
    exists to lock, and both would count their usage as new)."""
    if stored_before:
        await apply_events(ledger, ledger_events([started(seconds=0)]))
    legacy = appended(cost=100, seconds=5)  # rank 1
    final = finalized(calls=[call(cost=7)], seconds=10)  # rank 2: authoritative
    other = await asyncpg.connect(asyncpg_dsn(ledger_url))
    counted = 0
    try:
        async with other.transaction():
            stored = await load_state(
                other, ledger_events([final])
            )  # locks the thread until commit

            async def first_writer() -> int:
                async with ledger.transaction():
                    plan = await apply_events(ledger, ledger_events([legacy]))
                return sum(change.cost_micros for change in plan.usage_changes)

            waiting = asyncio.create_task(first_writer())
            await wait_for(lambda: _waits_on_a_lock(other), within=30, what="a lock wait")
            assert not waiting.done()
            plan = reduce_batch(ledger_events([final]), stored)
            await write_plan(other, plan)
            counted += sum(change.cost_micros for change in plan.usage_changes)
        counted += await waiting
    finally:
        await other.close()
    total = await ledger.fetchval("SELECT sum(cost_micros) FROM token_usage")
    assert counted == total == 7


async def _waits_on_a_lock(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )
