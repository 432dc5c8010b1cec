"""Reading Kafka and the ledger for the operator commands. None of them joins the consumer group:
they assign partitions by hand and read between known offsets, so they never disturb the running
consumers; the ledger is read through a connection checked against the schema revision.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError, for_code
from aiokafka.structs import ConsumerRecord

from consumer.failures import TopicMissingError
from consumer.kafka.closing import stop_consumer
from consumer.ledger.schema import connect_checked
from consumer.logs import fields
from consumer.settings import Settings

log = logging.getLogger(__name__)
FETCH_BYTES = 64 * 1024 * 1024


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_checked(settings)  # a ledger whose schema this release can read
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def reader(
    settings: Settings, fetch_bytes: int = FETCH_BYTES
) -> AsyncIterator[AIOKafkaConsumer]:
    """read_committed, like the consumer: verify rebuilds the ledger from the records the
    consumer can have applied, and replay's end offsets are the ends of what it reads.
    `fetch_bytes`: per partition and per fetch, at least the largest record it may meet."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=fetch_bytes,
        fetch_max_bytes=fetch_bytes,
        **settings.kafka_security(),
    )
    try:
        await consumer.start()
        yield consumer
    finally:  # also when start() fails: its half-made connections would be reported unclosed
        await stop_consumer(consumer)


async def topic_partitions(
    settings: Settings, topic: str, *, variable: str | None = None
) -> list[TopicPartition]:
    """The topic's partitions. A topic named by `variable` must exist (else TopicMissingError);
    one that may not exist yet (the dead letters, before the first) has none."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_security()
    )
    try:
        await admin.start()
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for t in described:  # e.g. TOPIC_AUTHORIZATION_FAILED: not the same as a missing topic
        if t["topic"] == topic and t["error_code"] not in (0, UnknownTopicOrPartitionError.errno):
            raise for_code(t["error_code"])(f"describing topic {topic}")
    found = sorted(
        TopicPartition(topic, p["partition"])
        for t in described
        if t["topic"] == topic and t["error_code"] == 0
        for p in t["partitions"]
    )
    if not found and variable is not None:
        raise TopicMissingError(
            f"topic {topic} does not exist at {settings.kafka_bootstrap}: check {variable} "
            "(`token-ledger consume` creates it)"
        )
    return found


async def read_range(
    consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int]
) -> AsyncGenerator[ConsumerRecord]:
    """Every record from the start of each partition up to (excluding) its end offset."""
    wanted = {tp: end for tp, end in ends.items() if end > 0}
    if not wanted:
        return
    # An end past the log's (a topic recreated under a ledger) would be waited for forever.
    log_ends = await consumer.end_offsets(list(wanted))
    for tp, end in sorted(wanted.items()):
        if end > log_ends[tp]:
            log.warning(
                "asked to read past the end of the log: reading up to its end",
                extra=fields(partition=tp.partition, asked=end, log_end=log_ends[tp]),
            )
    wanted = {tp: min(end, log_ends[tp]) for tp, end in wanted.items() if log_ends[tp] > 0}
    if not wanted:
        return
    consumer.assign(list(wanted))
    await consumer.seek_to_beginning(*wanted)
    remaining = {tp for tp, end in wanted.items() if await consumer.position(tp) < end}
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=1000)
        for tp, records in batch.items():
            for record in records:
                if record.offset < wanted[tp]:
                    yield record
        remaining = {tp for tp in remaining if await consumer.position(tp) < wanted[tp]}


async def dead_letter_records(
    settings: Settings, consumer: AIOKafkaConsumer, topic: str, *, variable: str | None = None
) -> AsyncIterator[ConsumerRecord]:
    partitions = await topic_partitions(settings, topic, variable=variable)
    ends = await consumer.end_offsets(partitions) if partitions else {}
    async for record in read_range(consumer, ends):
        yield record
