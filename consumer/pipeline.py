"""The Kafka loop, in Kafka Connect SinkTask verbs: open(partitions), put(batch),
close(partitions), stop().

One batch, in one direction:
  1. decode every record; dead-letter what cannot be an event (awaited: acked before any
     offset moves past it)
  2. one transaction, retried with capped backoff on transient failures (fetching paused):
     a. advance consumer_offsets by compare-and-set from the positions this owner expects
        (first: a zombie owner blocks here, then finds the offsets moved and is fenced)
     b. merge the batch against the stored registers and write the rows (store.apply_events);
        a record the database rejects (SQLSTATE 22/23) is isolated by splitting the batch
        under savepoints
     c. dead-letter the records rejected inside the transaction, awaited, before COMMIT
  3. mirror the new offsets to Kafka (for lag tooling only; PostgreSQL is the truth)
  4. metrics

The stored offsets are the source of truth: on assignment the consumer seeks to them, and a
fenced batch re-seeks to them. A rebalance waits for the batch in flight (or abandons it if it
is stuck retrying), so a partition is never committed after it was given up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.dlq import DeadLetter, DeadLetterQueue
from consumer.errors import (
    BatchAbandoned,
    DeadLetterUnavailableError,
    FencedError,
    PoisonError,
    TransientError,
    classify_database_error,
)
from consumer.health import Readiness
from consumer.lag import PartitionEnds, held_partitions
from consumer.logs import fields
from consumer.merge import BatchPlan, Outcome
from consumer.metrics import LedgerMetrics
from consumer.retry import Backoff, retry_transient
from consumer.settings import Settings
from consumer.store import OffsetMove, advance_offsets, apply_events, load_offsets
from producer.events import AnyEvent, Rejection, RejectReason, decode_event

log = logging.getLogger(__name__)
# aiokafka ships no type information: a record is a ConsumerRecord[bytes, bytes].
Record: TypeAlias = ConsumerRecord
T = TypeVar("T")
BATCH_BACKOFF = Backoff(initial=0.1, maximum=5.0)
IDLE_SYNC_SECONDS = 2.0


@dataclass
class Applied:
    """What one committed batch did, for metrics."""

    events: list[tuple[AnyEvent, Outcome]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    plans: list[BatchPlan] = field(default_factory=list)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.pipeline.close(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.pipeline.open(assigned)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        pool: asyncpg.Pool,
        dlq: DeadLetterQueue,
        metrics: LedgerMetrics,
        readiness: Readiness,
        backoff: Backoff = BATCH_BACKOFF,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.pool = pool
        self.dlq = dlq
        self.metrics = metrics
        self.readiness = readiness
        self.backoff = backoff
        # partition -> the stored next_offset this owner's next batch starts from (None: no row)
        self.positions: dict[int, int | None] = {}
        self._batch_lock = asyncio.Lock()
        self._revoking = False
        self._stop = asyncio.Event()
        self._lag_partitions: set[int] = set()
        self._last_sync = time.monotonic()

    @property
    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    def request_stop(self) -> None:
        """Stop taking work; the batch in flight still commits."""
        if not self._stop.is_set():
            log.info("stop requested: finishing the batch in flight")
            self._stop.set()

    # -- SinkTask verbs ------------------------------------------------------------------------

    async def open(self, assigned: Sequence[TopicPartition]) -> None:
        """Seek every newly assigned partition to the offset stored in PostgreSQL.

        Under the batch lock, so the loop never sees a partition before its seek is done."""
        self.metrics.rebalances.inc()
        mine = [tp for tp in assigned if tp.topic == self.settings.topic]
        async with self._batch_lock:
            stored = await self._load_offsets([tp.partition for tp in mine])
            await self._seek(mine, stored)
            for tp in mine:
                self.positions[tp.partition] = stored.get(tp.partition)
        self.readiness.assigned = frozenset(self.positions)
        log.info(
            "partitions assigned",
            extra=fields(partitions=sorted(self.positions), stored_offsets=stored),
        )

    async def close(self, revoked: Sequence[TopicPartition]) -> None:
        """Give partitions up only once the batch in flight has committed or been abandoned."""
        self._revoking = True
        try:
            async with self._batch_lock:
                for tp in revoked:
                    self.positions.pop(tp.partition, None)
                    if tp.partition in self._lag_partitions:
                        self._lag_partitions.discard(tp.partition)
                        self.metrics.consumer_lag.remove(str(tp.partition))
        finally:
            self._revoking = False
        self.readiness.assigned = frozenset(self.positions)
        log.info(
            "partitions revoked", extra=fields(partitions=sorted(tp.partition for tp in revoked))
        )

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume until stopped (or, with until_idle, until every partition is caught up)."""
        while not self._stop.is_set():
            batch = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.max_batch)
            records = sorted(
                (r for rs in batch.values() for r in rs), key=lambda r: (r.partition, r.offset)
            )
            async with self._batch_lock:
                if records:
                    await self.put(records)
                caught_up = await self._update_lag()
            if records:
                continue
            if until_idle and caught_up:
                log.info("caught up: every assigned partition is at its last stable offset")
                return
            if time.monotonic() - self._last_sync > IDLE_SYNC_SECONDS:
                async with self._batch_lock:
                    await self._follow_stored_offsets()

    async def put(self, records: list[Record]) -> None:
        owned = [r for r in records if self._expects(r)]
        if not owned:
            return
        started = time.monotonic()
        events, event_records, letters = self._decode(owned)
        try:
            await self._with_retry(lambda: self.dlq_report(letters))  # 1
            applied = await self._with_retry(
                lambda: self._commit(owned, events, event_records)
            )  # 2
        except FencedError as fenced:
            self.metrics.fenced_batches.inc()
            log.warning("batch fenced", extra=fields(partitions=fenced.partitions))
            await self._rewind(owned, reload=True)
            return
        except BatchAbandoned:
            log.warning("batch abandoned", extra=fields(records=len(owned)))
            await self._rewind(owned, reload=False)
            return
        await self._mirror_offsets()  # 3
        self._observe(applied, letters, len(owned), time.monotonic() - started)  # 4

    def _expects(self, record: Record) -> bool:
        """Owned, and not below the offset this owner has committed: a fetch issued before a
        seek can hand back records that are already in the ledger."""
        if record.partition not in self.positions:
            return False
        position = self.positions[record.partition]
        return position is None or record.offset >= position

    async def stop(self) -> None:
        self.request_stop()
        await self._batch_lock.acquire()  # wait for the batch in flight
        self._batch_lock.release()

    # -- steps ---------------------------------------------------------------------------------

    def _decode(
        self, records: list[Record]
    ) -> tuple[list[AnyEvent], list[Record], list[DeadLetter]]:
        events, event_records, letters = [], [], []
        for record in records:
            result = decode_event(
                record.value,
                timestamp_ms=record.timestamp,
                max_bytes=self.settings.max_event_bytes,
                max_future_skew=self.settings.future_skew,
            )
            if isinstance(result, Rejection):
                letters.append(DeadLetter(record, result.reason, result.detail))
            else:
                events.append(result)
                event_records.append(record)
        return events, event_records, letters

    async def dlq_report(self, letters: Sequence[DeadLetter]) -> None:
        try:
            await self.dlq.report(letters)
        except KafkaError as error:
            raise DeadLetterUnavailableError(
                f"dead-letter topic: {type(error).__name__}"
            ) from error

    async def _commit(
        self, records: list[Record], events: list[AnyEvent], event_records: list[Record]
    ) -> Applied:
        moves = self._moves(records)
        applied = Applied()
        async with self.pool.acquire() as conn, conn.transaction():
            await advance_offsets(conn, self.settings.group_id, self.settings.topic, moves)  # 2a
            await self._apply_isolating(
                conn, list(zip(events, event_records, strict=True)), applied
            )  # 2b
            await self.dlq_report(applied.letters)  # 2c
        for move in moves:
            self.positions[move.partition] = move.next_offset
        self.readiness.database_ok = True
        self.readiness.progressed()
        return applied

    async def _apply_isolating(
        self,
        conn: asyncpg.Connection,
        items: list[tuple[AnyEvent, Record]],
        applied: Applied,
    ) -> None:
        """Apply under a savepoint; on a data error split the batch until the record is alone."""
        if not items:
            return
        try:
            async with conn.transaction():
                plan = await apply_events(conn, [event for event, _ in items])
        except asyncpg.PostgresError as error:
            mapped = classify_database_error(error)
            if not isinstance(mapped, PoisonError):
                raise
            if len(items) == 1:
                event, record = items[0]
                log.warning(
                    "record rejected by the database",
                    extra=fields(
                        partition=record.partition, offset=record.offset, error=str(mapped)
                    ),
                )
                applied.letters.append(
                    DeadLetter(record, RejectReason.DATABASE_REJECTED, str(mapped))
                )
                applied.events.append((event, Outcome.REJECTED))
                return
            middle = len(items) // 2
            await self._apply_isolating(conn, items[:middle], applied)
            await self._apply_isolating(conn, items[middle:], applied)
            return
        applied.plans.append(plan)
        for index, ((event, record), outcome) in enumerate(zip(items, plan.outcomes, strict=True)):
            applied.events.append((event, outcome))
            if rejection := plan.rejections.get(index):
                applied.letters.append(DeadLetter(record, rejection.reason, rejection.detail))

    def _moves(self, records: list[Record]) -> list[OffsetMove]:
        last: dict[int, int] = {}
        for record in records:
            last[record.partition] = max(last.get(record.partition, -1), record.offset)
        return [
            OffsetMove(partition, self.positions[partition], offset + 1)
            for partition, offset in sorted(last.items())
        ]

    async def _with_retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Retry transient failures; fetching stays paused while it waits, whatever it runs
        for (a batch, loading offsets on assignment, following stored offsets when idle)."""
        paused: list[TopicPartition] = []

        def on_retry(error: TransientError, attempt: int, delay: float) -> None:
            if self._revoking or self._stop.is_set():
                raise BatchAbandoned from error
            if not isinstance(error, DeadLetterUnavailableError):
                self.readiness.database_ok = False
                self.metrics.db_retries.labels(error.sqlstate or "unavailable").inc()
            if not paused:
                paused.extend(self.consumer.assignment())
                self.consumer.pause(*paused)
            log.warning(
                "transient failure, retrying",
                extra=fields(error=str(error), attempt=attempt, delay_seconds=round(delay, 2)),
            )

        try:
            return await retry_transient(operation, self.backoff, on_retry)
        finally:
            if still_assigned := [tp for tp in paused if tp in self.consumer.assignment()]:
                self.consumer.resume(*still_assigned)

    async def _load_offsets(self, partitions: list[int]) -> dict[int, int]:
        async def load() -> dict[int, int]:
            async with self.pool.acquire() as conn:
                return await load_offsets(
                    conn, self.settings.group_id, self.settings.topic, partitions
                )

        return await self._with_retry(load)

    async def _seek(self, partitions: Sequence[TopicPartition], stored: dict[int, int]) -> None:
        for tp in partitions:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:  # nothing applied yet: the database, not Kafka's group offset, decides
                await self.consumer.seek_to_beginning(tp)

    async def _rewind(self, records: list[Record], *, reload: bool) -> None:
        """After a rolled-back batch, fetch its partitions again from where the ledger stands.

        Fenced: another owner moved the stored offsets, so read them. Abandoned: nothing was
        committed, so the offsets this owner expects still hold (and the database may be down).
        """
        partitions = sorted({r.partition for r in records} & set(self.positions))
        expected = {p: self.positions[p] for p in partitions}
        if reload:
            try:
                stored = await self._load_offsets(partitions)
                expected = {p: stored.get(p) for p in partitions}
            except BatchAbandoned:
                pass  # shutting down or giving the partitions up while the database is away
        self.positions.update(expected)
        await self._seek(
            [TopicPartition(self.settings.topic, p) for p in partitions],
            {p: offset for p, offset in expected.items() if offset is not None},
        )

    async def _follow_stored_offsets(self) -> None:
        """When idle, pick up offsets moved by someone else (`token-ledger replay`, a new owner)."""
        self._last_sync = time.monotonic()
        try:
            stored = await self._load_offsets(sorted(self.positions))
        except BatchAbandoned:
            return  # shutting down while the database is away
        moved = [p for p in sorted(self.positions) if stored.get(p) != self.positions[p]]
        if not moved:
            return
        log.info(
            "stored offsets moved: seeking to them",
            extra=fields(partitions=moved, offsets={p: stored.get(p) for p in moved}),
        )
        for partition in moved:
            self.positions[partition] = stored.get(partition)
        await self._seek([TopicPartition(self.settings.topic, p) for p in moved], stored)

    async def _mirror_offsets(self) -> None:
        offsets = {
            TopicPartition(self.settings.topic, p): offset
            for p, offset in self.positions.items()
            if offset is not None
        }
        try:
            await self.consumer.commit(offsets)
        except KafkaError as error:  # lag tooling only: PostgreSQL holds the truth
            log.warning(
                "could not mirror offsets to Kafka", extra=fields(error=type(error).__name__)
            )

    async def _update_lag(self) -> bool:
        """Refresh lag, records held by open transactions and readiness; True when every
        assigned partition is caught up: at its last stable offset, the end of what a
        read_committed consumer can read (consumer/lag.py)."""
        ends: dict[int, PartitionEnds] = {}
        caught_up = bool(self.positions)
        for partition in sorted(self.positions):
            tp = TopicPartition(self.settings.topic, partition)
            highwater, stable = self.consumer.highwater(tp), self.consumer.last_stable_offset(tp)
            # None until a fetch answered; -1 from a consumer that is not read_committed
            # (service.source_consumer always is): either way the end is unknown.
            if highwater is None or stable is None or stable < 0:
                caught_up = False
                continue
            end = PartitionEnds(await self.consumer.position(tp), stable, highwater)
            ends[partition] = end
            self.metrics.consumer_lag.labels(str(partition)).set(end.lag)
            self._lag_partitions.add(partition)
            caught_up = caught_up and end.lag == 0
        self.metrics.set_uncommitted({p: end.uncommitted for p, end in ends.items()})
        self.readiness.held = held_partitions(self.readiness.held, ends, time.monotonic())
        self.readiness.lag = sum(end.lag for end in ends.values())
        if self.readiness.lag == 0:
            self.readiness.progressed()  # idle is not stalled
        return caught_up

    def _observe(
        self, applied: Applied, decode_letters: list[DeadLetter], records: int, seconds: float
    ) -> None:
        letters = [*decode_letters, *applied.letters]
        self.metrics.observe_batch(
            records=records,
            seconds=seconds,
            outcomes=[
                (event.type, event.occurred_at, outcome) for event, outcome in applied.events
            ],
            unknown_fields=[
                (event.type, event.unknown_fields)
                for event, _ in applied.events
                if event.unknown_fields
            ],
            undecodable=len(decode_letters),
            dead_letter_reasons=[letter.reason.value for letter in letters],
            usage_changes=[change for plan in applied.plans for change in plan.usage_changes],
        )
        log.debug(
            "batch committed",
            extra=fields(records=records, seconds=round(seconds, 4), dead_letters=len(letters)),
        )
