"""What bounds a drain from above and from below, measured on the same backlog:

- raw read: aiokafka alone reading the topic start to end (no decoding): the Kafka ceiling;
- COPY: the drained ledger's final rows copied into empty tables with the same indexes, in
  one transaction: the PostgreSQL ceiling for writing that much;
- naive: one transaction per record (decode, offsets, load state, merge, write, commit),
  the design every batching choice is measured against.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.services import Services
from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.decode import decode_ledger_event
from consumer.ledger.offsets import OffsetMove, advance_offsets
from producer.events import DEFAULT_MAX_EVENT_BYTES, Rejection

LEDGER_TABLES = ("chat_threads", "chat_messages", "token_usage", "consumer_offsets")


@dataclass(frozen=True)
class Ceiling:
    seconds: float
    items: int  # records read, or rows copied / records applied
    pg_cpu_seconds: float = 0.0


async def raw_read(bootstrap: str, topic: str, partitions: int) -> Ceiling:
    """Every record of the topic, from the beginning, with nothing done to it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=DEFAULT_MAX_EVENT_BYTES,
        fetch_max_bytes=50 * 1024 * 1024,
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(assigned)
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        started = time.monotonic()
        count = 0
        remaining = set(assigned)
        while remaining:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            count += sum(len(records) for records in batch.values())
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
        return Ceiling(time.monotonic() - started, count)
    finally:
        await consumer.stop()


async def copy_ceiling(services: Services, drained_url: str, empty_url: str) -> Ceiling:
    """The drained ledger's rows into an empty ledger by COPY, one transaction."""
    source = await asyncpg.connect(asyncpg_dsn(drained_url))
    dumps: dict[str, bytes] = {}
    try:
        for table in LEDGER_TABLES:
            out = io.BytesIO()
            await source.copy_from_table(table, output=out, format="binary")
            dumps[table] = out.getvalue()
        rows = 0
        for table in LEDGER_TABLES:
            rows += int(await source.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await source.close()
    target = await asyncpg.connect(asyncpg_dsn(empty_url))
    try:
        pg_before = services.postgres_cpu()
        started = time.monotonic()
        async with target.transaction():
            for table in LEDGER_TABLES:  # in foreign key order
                await target.copy_to_table(table, source=io.BytesIO(dumps[table]), format="binary")
        seconds = time.monotonic() - started
        return Ceiling(seconds, rows, services.postgres_cpu() - pg_before)
    finally:
        await target.close()


async def naive(
    services: Services, database_url: str, records: list[tuple[bytes, bytes]]
) -> Ceiling:
    """One transaction per record, as a consumer without batching would run it."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    published_ms = int(time.time() * 1000)
    try:
        pg_before = services.postgres_cpu()
        started = time.monotonic()
        for offset, (_, value) in enumerate(records):
            event = decode_ledger_event(
                value, timestamp_ms=published_ms, max_future_skew=timedelta(hours=1)
            )
            async with conn.transaction():
                move = OffsetMove(0, offset if offset else None, offset + 1)
                await advance_offsets(conn, "naive", "naive", [move])
                if not isinstance(event, Rejection):
                    await apply_events(conn, [event])
        seconds = time.monotonic() - started
        return Ceiling(seconds, len(records), services.postgres_cpu() - pg_before)
    finally:
        await conn.close()
