"""Operator commands that read Kafka directly: verify, replay, dlq list/replay.

None of them joins the consumer group: they assign partitions by hand and read between known
offsets, so they never disturb the running consumers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from operator import itemgetter

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError, for_code
from aiokafka.structs import ConsumerRecord

from consumer.commands.queries import applied_offsets, ledger_by_thread, rewind_offsets
from consumer.commands.spill import SortedSpill
from consumer.failures import TopicMissingError
from consumer.kafka import dead_letters as dlq
from consumer.kafka.closing import stop_consumer
from consumer.ledger.claims import StoredState
from consumer.ledger.merge import Admission
from consumer.ledger.rebuild import (
    TOTALS,
    Difference,
    LedgerRows,
    add_totals,
    compare,
    rebuild_by_thread,
)
from consumer.ledger.schema import connect_checked
from consumer.logs import fields
from consumer.settings import Settings
from producer.client import ProducerResource
from producer.decoding import decode_event
from producer.events import AnyEvent, Rejection

log = logging.getLogger(__name__)
FETCH_BYTES = 64 * 1024 * 1024
# verify's fetches: parsed records cost several times their bytes, so this bounds its memory.
# A record larger than it is still returned whole (the broker hands out a first batch of any
# size), as is one over the topic's max.message.bytes lowered after it was written.
VERIFY_FETCH_BYTES = 1024 * 1024


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_checked(settings)  # a ledger whose schema this release can read
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _reader(
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


async def _partitions(
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
) -> AsyncIterator[ConsumerRecord]:
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


# -- verify ----------------------------------------------------------------------------------


MAX_DIFFERENCES = 1_000  # kept to show; all of them are counted


@dataclass
class VerifyReport:
    records_read: int = 0
    skipped: int = 0  # undecodable, dead-lettered or rejected by the merge: never in the ledger
    expected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    actual: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    differences: list[Difference] = field(default_factory=list)  # the first MAX_DIFFERENCES
    difference_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.difference_count and self.expected == self.actual

    def add(self, expected: LedgerRows, actual: LedgerRows) -> None:
        add_totals(self.expected, expected)
        add_totals(self.actual, actual)
        found = compare(expected, actual)
        self.difference_count += len(found)
        self.differences.extend(found[: MAX_DIFFERENCES - len(self.differences)])


async def _dead_lettered_positions(
    settings: Settings, consumer: AIOKafkaConsumer
) -> set[tuple[int, int]]:
    positions = set()
    async for record in _dead_letters(settings, consumer, settings.dlq_topic):
        source = dlq.source_position(record)
        if source is not None and source.topic == settings.topic:
            positions.add((source.partition, source.offset))
    return positions


# An admitted record, spilled to be regrouped by thread: (thread_id, arrival, timestamp, value).
Spilled = tuple[int, int, int, bytes]


async def verify(settings: Settings) -> VerifyReport:
    """Rebuild the ledger from the topic (up to the furthest offsets ever applied: a `replay`
    moves the stored ones back, not the ledger) and compare it, one thread
    at a time. The records are read once in arrival order (the order-dependent rules need it)
    and spilled to sorted temporary files, then each thread's records are folded and compared
    with that thread's stored rows, read through cursors. Memory does not grow with records or
    rows: it is one thread's rows, the fetch and spill buffers, and an entry per thread and per
    turn-less message (merge.Admission) and per dead letter. The offsets and the ledger are
    read in one REPEATABLE READ snapshot, held for the whole run (like pg_dump's), so verify
    can run beside the consumers (the rows and offsets of a batch commit together)."""
    report = VerifyReport()
    partitions = await _partitions(settings, settings.topic, variable="LEDGER_TOPIC")
    async with (
        _reader(settings, VERIFY_FETCH_BYTES) as consumer,
        _database(settings) as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # Open while the topic is read (minutes for millions of records): the server's
        # timeouts must not end it (pg_dump does the same). Takes no snapshot: the first
        # query does.
        await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        if conn.get_server_version().major >= 17:  # unknown to older servers
            await conn.execute("SET LOCAL transaction_timeout = 0")
        applied = await applied_offsets(
            conn, settings.group_id, settings.topic, [tp.partition for tp in partitions]
        )
        skip = await _dead_lettered_positions(settings, consumer)
        admission = Admission(StoredState())
        ends = {tp: applied.get(tp.partition, 0) for tp in partitions}
        spill: SortedSpill[Spilled] = SortedSpill(key=itemgetter(0, 1), size=_spilled_bytes)
        with spill:
            async for record in read_range(consumer, ends):
                report.records_read += 1
                event = decode_event(
                    record.value,
                    timestamp_ms=record.timestamp,
                    max_bytes=settings.max_event_bytes,
                    max_future_skew=settings.future_skew,
                )
                if (
                    isinstance(event, Rejection)
                    or (record.partition, record.offset) in skip
                    or admission.check(event) is not None
                ):
                    report.skipped += 1
                    continue
                assert record.value is not None  # it decoded
                spill.add((event.thread_id, report.records_read, record.timestamp, record.value))
            expected = rebuild_by_thread(_by_thread(spill, settings.max_event_bytes))
            await _compare(expected, ledger_by_thread(conn), report)
    return report


def _spilled_bytes(item: Spilled) -> int:
    return len(item[3])


def _by_thread(
    spilled: Iterable[Spilled], max_bytes: int
) -> Iterator[tuple[int, Iterator[AnyEvent]]]:
    """The spilled records, decoded again, one thread at a time in arrival order."""
    for thread_id, records in groupby(spilled, key=itemgetter(0)):
        yield thread_id, (_decoded_again(value, at, max_bytes) for _, _, at, value in records)


def _decoded_again(value: bytes, timestamp_ms: int, max_bytes: int) -> AnyEvent:
    # The skew was judged on the first read.
    event = decode_event(
        value, timestamp_ms=timestamp_ms, max_bytes=max_bytes, max_future_skew=None
    )
    if isinstance(event, Rejection):  # decoding is a function of (value, timestamp)
        raise RuntimeError(f"a record decoded the second time was rejected: {event.reason}")
    return event


async def _compare(
    expected: Iterator[tuple[int, LedgerRows]],
    actual: AsyncIterator[tuple[int, LedgerRows]],
    report: VerifyReport,
) -> None:
    """Merge-join the expected and the stored threads (both in ascending thread id)."""
    want, have = next(expected, None), await anext(actual, None)
    while want is not None or have is not None:
        if have is None or (want is not None and want[0] < have[0]):
            assert want is not None
            report.add(want[1], NO_ROWS)
            want = next(expected, None)
        elif want is None or have[0] < want[0]:
            report.add(NO_ROWS, have[1])
            have = await anext(actual, None)
        else:
            report.add(want[1], have[1])
            want, have = next(expected, None), await anext(actual, None)


NO_ROWS = LedgerRows(threads={}, messages={}, usage={})


# -- replay ----------------------------------------------------------------------------------


async def replay(
    settings: Settings,
    *,
    from_time: datetime | None = None,
    to_offset: int | None = None,
    partition: int | None = None,
) -> dict[int, tuple[int, int]]:
    """Rewind the stored offsets so that the consumers apply the range again."""
    async with _reader(settings) as consumer, _database(settings) as conn:
        partitions = [
            tp
            for tp in await _partitions(settings, settings.topic, variable="LEDGER_TOPIC")
            if partition is None or tp.partition == partition
        ]
        if from_time is not None:
            found = await consumer.offsets_for_times(
                {tp: int(from_time.timestamp() * 1000) for tp in partitions}
            )
            ends = await consumer.end_offsets(partitions)
            targets = {
                tp.partition: found[tp].offset if found.get(tp) else ends[tp] for tp in partitions
            }
        else:
            assert to_offset is not None
            targets = {tp.partition: to_offset for tp in partitions}
        return await rewind_offsets(conn, settings.group_id, settings.topic, targets)


# -- dead letters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterView:
    partition: int
    offset: int
    reason: str
    detail: str
    source: str
    failed_at: str
    size: int


async def _dead_letters(
    settings: Settings, consumer: AIOKafkaConsumer, topic: str, *, variable: str | None = None
) -> AsyncIterator[ConsumerRecord]:
    partitions = await _partitions(settings, topic, variable=variable)
    ends = await consumer.end_offsets(partitions) if partitions else {}
    async for record in read_range(consumer, ends):
        yield record


def _view(record: ConsumerRecord) -> DeadLetterView:
    # A header's value may be null (Kafka allows it, and a dead letter keeps the original's).
    headers = {k: (v or b"").decode(errors="replace") for k, v in (record.headers or ())}
    return DeadLetterView(
        partition=record.partition,
        offset=record.offset,
        reason=headers.get(dlq.REASON, "?"),
        detail=headers.get(dlq.DETAIL, ""),
        source=f"{headers.get(dlq.SOURCE_TOPIC, '?')}[{headers.get(dlq.SOURCE_PARTITION, '?')}]"
        f"@{headers.get(dlq.SOURCE_OFFSET, '?')}",
        failed_at=headers.get(dlq.FAILED_AT, ""),
        size=len(record.value or b""),
    )


async def list_dead_letters(settings: Settings, reason: str | None = None) -> list[DeadLetterView]:
    async with _reader(settings) as consumer:
        views = [
            _view(record)
            async for record in _dead_letters(
                settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
            )
        ]
    return [view for view in views if reason is None or view.reason == reason]


async def replay_dead_letters(
    settings: Settings, reason: str | None = None, *, dry_run: bool = False
) -> list[DeadLetterView]:
    """Publish dead letters' original records to their source topic again (e.g. after a fix).

    Replaying is safe to repeat: the ledger dedupes events, and a record that is still bad
    returns to the dead-letter topic.
    """
    async with _reader(settings) as consumer:
        chosen = [
            record
            async for record in _dead_letters(
                settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
            )
            if reason is None or _view(record).reason == reason
        ]
    if dry_run or not chosen:
        return [_view(r) for r in chosen]
    async with ProducerResource(
        settings.kafka_bootstrap,
        client_id="token-ledger-dlq-replay",
        max_request_size=FETCH_BYTES,
        **settings.kafka_security(),
    ) as producer:
        for record in chosen:
            source = dlq.source_position(record)
            if source is None:  # not one of ours: nothing says where it came from
                log.warning(
                    "not replayed: the record names no source topic",
                    extra=fields(partition=record.partition, offset=record.offset),
                )
                continue
            original = [(k, v) for k, v in (record.headers or ()) if k not in dlq.LEDGER_HEADERS]
            await producer.send_and_wait(
                source.topic, record.value, key=record.key, headers=original
            )
    return [_view(r) for r in chosen]
