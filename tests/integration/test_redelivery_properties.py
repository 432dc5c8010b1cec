"""Redeliveries, as a property through the real batch transaction (commit_batch) and the real
lookup (applied_before): a record is stored in applied_records exactly when it was applied
(never when it was dead-lettered: undecodable, merge-rejected, refused by the database), and
an offset replay of the same records in other batch splits, skipping what is recognised,
leaves the ledger as a replay without the lookup leaves it, and dead-letters the same
positions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.commands.queries import read_ledger
from consumer.kafka.dead_letters import DeadLetter
from consumer.ledger.applied import applied_before
from consumer.ledger.batch import Decoding, commit_batch
from consumer.ledger.claims import Outcome
from consumer.ledger.database import asyncpg_dsn, create_pool
from consumer.ledger.offsets import OffsetMove
from tests.conftest import _fresh_database
from tests.examples import example
from tests.mutations import mutated_values
from tests.strategies import batch_splits

TOPIC = "t"
GROUP = "g"
TABLES = (
    "billing_outbox, token_usage, chat_messages, chat_threads, consumer_offsets,"
    " dead_lettered, applied_records"
)
IDS = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 4)]
TIMES = ["2026-11-26T09:00:00Z", "2026-11-26T09:00:01Z", "2026-11-26T09:00:00.5Z"]
MS = 1_795_683_600_000  # 2026-11-26T09:00:00Z


@st.composite
def order_dependent(draw: st.DrawFn) -> bytes:
    """Events that meet the order-dependent rules: few threads in two search spaces, few
    event_ids, turn-less messages, and a record the database refuses (the marker)."""
    name = draw(st.sampled_from(["turn.started", "turn.finalized", "message.appended"]))
    body = example(name)
    body["event_id"] = draw(st.sampled_from(IDS))
    body["thread_id"] = draw(st.sampled_from([7, 8]))
    body["search_space_id"] = draw(st.sampled_from([1, 2]))
    body["occurred_at"] = draw(st.sampled_from(TIMES))
    if name == "message.appended":
        if draw(st.booleans()):
            body["turn_id"] = None
        body["role"] = draw(st.sampled_from(["assistant", "system"]))
        if body["role"] != "assistant":
            body["token_usage"] = None
    if name == "turn.started" and draw(st.integers(0, 5)) == 0:
        body["user_query"] = "refused-by-db"
    return json.dumps(body).encode()


values = st.one_of(order_dependent(), order_dependent(), mutated_values(), st.just(b"{bad"))
timestamps = st.sampled_from([MS, MS + 1, None, -1])


async def _noop(letters: Sequence[DeadLetter]) -> None:
    pass


class Side:
    def __init__(self, loop: asyncio.AbstractEventLoop, url: str) -> None:
        self.loop = loop
        self.pool: asyncpg.Pool = loop.run_until_complete(create_pool(url))
        self.conn: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(asyncpg_dsn(url)))
        loop.run_until_complete(
            self.conn.execute(
                "ALTER TABLE chat_messages ADD CONSTRAINT refuses_marker"
                " CHECK (content::text NOT LIKE '%refused-by-db%')"
            )
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.run_until_complete(self.pool.close())

    async def apply(
        self, batches: list[list[ConsumerRecord]], recognise: bool
    ) -> tuple[set[tuple[int, int]], set[tuple[int, int]], set[tuple[int, int]]]:
        """(applied positions, dead-lettered positions, recognised positions)"""
        applied: set[tuple[int, int]] = set()
        letters: set[tuple[int, int]] = set()
        known_all: set[tuple[int, int]] = set()
        stored = {
            r["partition"]: r["next_offset"]
            for r in await self.conn.fetch("SELECT partition, next_offset FROM consumer_offsets")
        }
        for batch in batches:
            known = await applied_before(self.pool, GROUP, TOPIC, batch) if recognise else {}
            known_all |= set(known)
            decoding = Decoding(max_bytes=1 << 20, max_future_skew=timedelta(days=3650))
            decoding.add(batch, known)
            decoded = decoding.decoded
            moves = []
            for p in sorted({r.partition for r in batch}):
                last = max(r.offset for r in batch if r.partition == p)
                moves.append(OffsetMove(p, stored.get(p), last + 1))
                stored[p] = last + 1
            done = await commit_batch(self.pool, GROUP, TOPIC, moves, decoded, _noop)
            for record, (_, outcome) in zip(decoded.records, done.events, strict=True):
                position = (record.partition, record.offset)
                (letters if outcome is Outcome.REJECTED else applied).add(position)
            letters |= {(x.record.partition, x.record.offset) for x in decoded.letters}
        return applied, letters, known_all


@pytest.fixture
async def reference_url(postgres_url: str, ledger_template: str) -> AsyncIterator[str]:
    async for url in _fresh_database(postgres_url, template=ledger_template):
        yield url


@pytest.fixture
def sides(ledger_url: str, reference_url: str) -> Iterator[tuple[Side, Side]]:
    loop = asyncio.new_event_loop()
    pair = Side(loop, ledger_url), Side(loop, reference_url)
    yield pair
    for side in pair:
        side.close()
    loop.close()


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_recognised_means_applied_and_skipping_it_changes_nothing(
    sides: tuple[Side, Side], data: st.DataObject
) -> None:
    """Pass 1 on two identical ledgers; pass 2 (an offset replay, other batch splits) with the
    lookup on one (the change) and off on the other (as before it): same ledger, same dead
    letters, and what was recognised is what pass 1 applied."""
    drawn = data.draw(st.lists(st.tuples(st.integers(0, 1), values, timestamps), max_size=10))
    counts = {0: 0, 1: 0}
    records = []
    for partition, value, timestamp in drawn:
        offset = counts[partition]
        records.append(
            ConsumerRecord(TOPIC, partition, offset, timestamp, 0, b"1", value, None, 1, 0, [])
        )
        counts[partition] += 1
    records.sort(key=lambda r: (r.partition, r.offset))
    if not records:
        return
    changed, reference = sides
    run = changed.loop.run_until_complete
    first = data.draw(batch_splits(records))
    second = data.draw(batch_splits(records))
    passes = []
    for side in sides:
        run(side.conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY"))
        passes.append(run(side.apply(first, recognise=False)))
    assert passes[0][:2] == passes[1][:2]
    applied, letters, _ = passes[0]
    assert not applied & letters
    assert set(run(applied_before(changed.pool, GROUP, TOPIC, records))) == applied
    for side in sides:
        run(side.conn.execute("UPDATE consumer_offsets SET next_offset = 0"))
    _, letters_changed, recognised = run(changed.apply(second, recognise=True))
    _, letters_reference, _ = run(reference.apply(second, recognise=False))
    assert recognised == applied
    assert letters_changed == letters_reference
    assert run(read_ledger(changed.conn)) == run(read_ledger(reference.conn))
