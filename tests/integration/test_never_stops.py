"""The "never stops" property (docs/operations.md#when-things-fail): whatever a batch holds —
valid events, their mutations (fields removed, types swapped, edge timestamps, reused ids, huge
values, numbers at and past the edges of docs/contract.md#numbers) or raw bytes — decode ->
reduce -> store against the real database raises nothing out of the batch, every record is
applied or dead-lettered (never both, never neither), the database refuses nothing the decoder
accepted, the ledger equals the pure rebuild of the accepted events, and what the later paths
read back (the relay's records, usage sums) never fails. The same records through the real
commands, with headers whose values are null, stop none of them either."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.billing import records as billing
from consumer.billing.records import OUTBOX_COLUMNS, billing_event
from consumer.commands.queries import read_ledger, usage_report
from consumer.ledger.batch import Applied, apply_isolating, decode_records
from consumer.ledger.claims import Outcome
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.rebuild import expected_rows, rebuild
from producer import jsonvalues
from producer.events import DEFAULT_MAX_FUTURE_SKEW, RejectReason
from producer.ledger_event import LedgerEvent
from tests.integration.harness import Stack
from tests.mutations import mutated_values
from tests.strategies import batch_splits

TABLES = "billing_outbox, token_usage, chat_messages, chat_threads"
PUBLISHED_MS = int(datetime(2026, 11, 26, 10, tzinfo=UTC).timestamp() * 1000)
record_values = st.one_of(
    mutated_values(), mutated_values(), st.binary(max_size=64), st.just(b""), st.none()
)
record_timestamps = st.sampled_from([PUBLISHED_MS, None, -1, 0, 9_000_000_000_000_000])


class Driver:
    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(asyncpg_dsn(url))
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()

    async def run(self, batches: list[list[ConsumerRecord]]) -> Outcomes:
        await self.conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
        seen = Outcomes()
        for batch in batches:
            decoded = decode_records(
                batch, max_bytes=1024 * 1024, max_future_skew=DEFAULT_MAX_FUTURE_SKEW
            )
            applied = Applied()
            async with self.conn.transaction():
                await apply_isolating(
                    self.conn, list(zip(decoded.events, decoded.records, strict=True)), applied
                )
            seen.accepted += decoded.events
            seen.undecodable += [letter.record.offset for letter in decoded.letters]
            seen.rejected += [(letter.record.offset, letter.reason) for letter in applied.letters]
            # apply_isolating keeps the order of its items, halves included.
            for record, (_, outcome) in zip(decoded.records, applied.events, strict=True):
                seen.outcomes[record.offset] = outcome
        await self.read_back()
        return seen

    async def read_back(self) -> None:
        """What the paths after the batch do with what it stored: the relay builds every
        revision's record, `usage` sums and prints every grouping (docs/contract.md#numbers)."""
        rows = await self.conn.fetch(
            f"SELECT {OUTBOX_COLUMNS} FROM billing_outbox AS o"
            " LEFT JOIN chat_messages AS m ON m.id = o.message_id ORDER BY o.id"
        )
        for row in rows:
            billing.encode(billing_event(row))
        for by in (["model"], ["user", "day"], ["space", "month"]):
            for line in await usage_report(self.conn, by):
                jsonvalues.dumps(line)
                str(line)


@dataclass
class Outcomes:
    accepted: list[LedgerEvent] = field(default_factory=list)
    undecodable: list[int] = field(default_factory=list)
    rejected: list[tuple[int, RejectReason]] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)


@pytest.fixture
def driver(ledger_url: str) -> Iterator[Driver]:
    driver = Driver(ledger_url)
    yield driver
    driver.close()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_record_stops_a_batch_and_each_is_applied_or_dead_lettered(
    driver: Driver, data: st.DataObject
) -> None:
    values = data.draw(st.lists(record_values, min_size=1, max_size=8))
    records = [
        ConsumerRecord("t", 0, offset, data.draw(record_timestamps), 0, b"1", value, None, 1, 0, [])
        for offset, value in enumerate(values)
    ]
    batches = data.draw(batch_splits(records))
    seen = driver.loop.run_until_complete(driver.run(batches))

    # Every record exactly once: undecodable, or decoded with one outcome; a decoded record is
    # dead-lettered exactly when its outcome says so.
    assert sorted([*seen.undecodable, *seen.outcomes]) == list(range(len(records)))
    rejected = [offset for offset, _ in seen.rejected]
    assert sorted(rejected) == sorted(
        offset for offset, outcome in seen.outcomes.items() if outcome is Outcome.REJECTED
    )
    assert RejectReason.DATABASE_REJECTED not in {reason for _, reason in seen.rejected}
    assert driver.loop.run_until_complete(read_ledger(driver.conn)) == expected_rows(
        rebuild(seen.accepted)
    )


# Headers as producers send them: any names, values null or bytes (Kafka allows a null value),
# one of ours among them.
record_headers = st.lists(
    st.tuples(
        st.sampled_from(["trace", "tenant", "ledger.error.reason"]),
        st.one_of(st.none(), st.binary(max_size=8)),
    ),
    max_size=3,
)


async def _publish(stack: Stack, records: list[tuple[bytes | None, list[Any]]]) -> None:
    await stack.create_topic()
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            await producer.send(stack.topic, value, key=b"4242", headers=headers)
            for value, headers in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _empty_ledger(url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(f"TRUNCATE {TABLES}, consumer_offsets RESTART IDENTITY")
    finally:
        await conn.close()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_record_stops_the_relay_verify_usage_or_the_dead_letter_commands(
    kafka_bootstrap: str, ledger_url: str, data: st.DataObject
) -> None:
    """Past the batch, through the real commands: whatever was published, `consume
    --until-idle` applies or dead-letters it and bills every revision (exit 0), `verify`
    compares (exit 0 or 1, never a crash), and `usage` in every format and the dead-letter
    commands answer (exit 0)."""
    values = data.draw(st.lists(record_values, min_size=1, max_size=6))
    records = [(value, data.draw(record_headers)) for value in values]
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    asyncio.run(_empty_ledger(ledger_url))
    asyncio.run(_publish(stack, records))

    def run(*args: str) -> int:
        done = stack.cli(*args)
        assert done.returncode != 70, (args, done.stderr[-3000:])
        return done.returncode

    assert run("consume", "--until-idle") == 0
    assert run("verify") in (0, 1)
    for output in ("table", "csv", "json"):
        assert run("usage", "--by=model", "--by=user", "--by=day", f"--format={output}") == 0
    assert run("dlq", "list") == 0
    assert run("dlq", "replay", "--dry-run") == 0
