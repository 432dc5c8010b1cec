"""`token-ledger verify`: the ledger rebuilt from the topic by the merge rules, compared with
the database, one thread at a time in bounded memory (docs/operations.md#commands)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter

import asyncpg
from aiokafka import AIOKafkaConsumer

from consumer.commands.budget_check import check_budgets
from consumer.commands.queries import applied_offsets, ledger_by_thread
from consumer.commands.reading import (
    database,
    dead_letter_records,
    read_range,
    reader,
    topic_partitions,
)
from consumer.commands.spill import SortedSpill
from consumer.kafka import dead_letters as dlq
from consumer.ledger.claims import StoredState
from consumer.ledger.decode import decode_ledger_event
from consumer.ledger.merge import Admission
from consumer.ledger.rebuild import (
    TOTALS,
    Difference,
    LedgerRows,
    add_totals,
    compare,
    rebuild_by_thread,
)
from consumer.logs import fields
from consumer.settings import Settings
from producer.events import Rejection
from producer.ledger_event import LedgerEvent

log = logging.getLogger(__name__)
# verify's fetches: parsed records cost several times their bytes, so this bounds its memory.
# A record larger than it is still returned whole (the broker hands out a first batch of any
# size), as is one over the topic's max.message.bytes lowered after it was written.
VERIFY_FETCH_BYTES = 1024 * 1024


MAX_DIFFERENCES = 1_000  # kept to show; all of them are counted


@dataclass(frozen=True)
class Coverage:
    """How far verify compared one partition."""

    partition: int
    applied: int  # compared up to here (excluded): the furthest offset the ledger holds
    log_end: int  # the last stable offset: the end of what a read_committed reader can read
    not_applied: int  # records (not offsets) from `applied` to `log_end`: the consumers' share


@dataclass
class VerifyReport:
    # Per partition, in partition order; empty when the group has no stored offsets.
    coverage: list[Coverage] = field(default_factory=list)
    # The group has no stored offsets for the topic, yet the ledger holds rows or other groups
    # have offsets for it: a mistyped LEDGER_GROUP_ID (or LEDGER_TOPIC). Nothing was compared.
    no_offsets: bool = False
    other_groups: list[str] = field(default_factory=list)  # with offsets for the topic
    # No stored offsets, no record on the topic and no row in the ledger: an empty ledger
    # beside an empty topic, as after `migrate` (clean, and said so).
    nothing_to_compare: bool = False
    records_read: int = 0
    skipped: int = 0  # undecodable, dead-lettered or rejected by the merge: never in the ledger
    expected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    actual: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    differences: list[Difference] = field(default_factory=list)  # the first MAX_DIFFERENCES
    difference_count: int = 0
    # The ledger holds a value PostgreSQL cannot print (written by a release before numbers
    # were bounded at decode): the comparison stopped there.
    unreadable: str | None = None

    @property
    def ok(self) -> bool:
        return (
            not self.no_offsets
            and not self.difference_count
            and self.expected == self.actual
            and self.unreadable is None
        )

    @property
    def not_applied(self) -> int:
        """Committed records on the topic that the ledger does not hold yet (not compared)."""
        return sum(c.not_applied for c in self.coverage)

    def add(self, expected: LedgerRows, actual: LedgerRows) -> None:
        add_totals(self.expected, expected)
        add_totals(self.actual, actual)
        self.add_differences(compare(expected, actual))

    def add_differences(self, found: list[Difference]) -> None:
        self.difference_count += len(found)
        self.differences.extend(found[: MAX_DIFFERENCES - len(self.differences)])


async def _dead_lettered_positions(
    settings: Settings, consumer: AIOKafkaConsumer
) -> set[tuple[int, int]]:
    positions = set()
    async for record in dead_letter_records(settings, consumer, settings.dlq_topic):
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
    can run beside the consumers (the rows and offsets of a batch commit together).

    The topic is read on to its last stable offset: the records past the applied offsets are
    counted per partition (`Coverage.not_applied`, records, not offsets: transaction markers
    and aborted records take offsets too), not compared."""
    report = VerifyReport()
    partitions = await topic_partitions(settings, settings.topic, variable="LEDGER_TOPIC")
    async with (
        reader(settings, VERIFY_FETCH_BYTES) as consumer,
        database(settings) as conn,
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
        stable = await consumer.end_offsets(partitions)  # read_committed: the LSOs
        if not applied:
            # Without any offsets and rows, no consumer applied anything yet (one may be
            # starting): every record is counted as not applied. With them, the ledger was
            # written under another group: a mistyped group would compare as all differences.
            report.other_groups = await _groups_of(conn, settings.topic)
            # Every ledger row hangs off a thread.
            has_rows = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM chat_threads)")
            if report.other_groups or has_rows:
                report.no_offsets = True
                return report
        for tp in partitions:
            if applied.get(tp.partition, 0) > stable[tp]:
                log.warning(  # e.g. the topic was recreated under the ledger
                    "the ledger holds offsets past the end of the log: comparing up to its end",
                    extra=fields(
                        partition=tp.partition, applied=applied[tp.partition], log_end=stable[tp]
                    ),
                )
        skip = await _dead_lettered_positions(settings, consumer)
        admission = Admission(StoredState())
        beyond = dict.fromkeys((tp.partition for tp in partitions), 0)
        spill: SortedSpill[Spilled] = SortedSpill(key=itemgetter(0, 1), size=_spilled_bytes)
        with spill:
            # One pass to the end of the log: what lies past the applied offsets is only counted.
            async for record in read_range(consumer, stable):
                if record.offset >= applied.get(record.partition, 0):
                    beyond[record.partition] += 1
                    continue
                report.records_read += 1
                event = decode_ledger_event(
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
            try:
                # A savepoint: a row that cannot be read ends the comparison, not the snapshot's
                # transaction, which the budgets' check below still reads.
                async with conn.transaction():
                    await _compare(expected, ledger_by_thread(conn), report)
            except asyncpg.ProgramLimitExceededError as error:  # SQLSTATE 54000
                report.unreadable = f"SQLSTATE {error.sqlstate}: {str(error).splitlines()[0]}"
            # The budgets' states against the same snapshot of the ledger's rows.
            report.add_differences(await check_budgets(conn))
    report.coverage = [
        Coverage(tp.partition, applied.get(tp.partition, 0), stable[tp], beyond[tp.partition])
        for tp in partitions
    ]
    report.nothing_to_compare = not applied and not report.not_applied
    return report


async def _groups_of(conn: asyncpg.Connection, topic: str, most: int = 5) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT group_id FROM consumer_offsets WHERE topic = $1 ORDER BY 1 LIMIT $2",
        topic,
        most,
    )
    return [row["group_id"] for row in rows]


def _spilled_bytes(item: Spilled) -> int:
    return len(item[3])


def _by_thread(
    spilled: Iterable[Spilled], max_bytes: int
) -> Iterator[tuple[int, Iterator[LedgerEvent]]]:
    """The spilled records, decoded again, one thread at a time in arrival order."""
    for thread_id, records in groupby(spilled, key=itemgetter(0)):
        yield thread_id, (_decoded_again(value, at, max_bytes) for _, _, at, value in records)


def _decoded_again(value: bytes, timestamp_ms: int, max_bytes: int) -> LedgerEvent:
    # The skew was judged on the first read.
    event = decode_ledger_event(
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
