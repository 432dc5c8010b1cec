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
  3. mirror the new offsets to Kafka (for lag tooling only, bounded: PostgreSQL is the truth)
  4. metrics

The stored offsets are the source of truth: on assignment the consumer seeks to them, and a
fenced batch re-seeks to them. A rebalance waits for the batch in flight (or abandons it if it
is stuck retrying), so a partition is never committed after it was given up.

No record and no database answer ends the process (SPEC section 4): a record is applied or
dead-lettered; a transient failure retries the batch with backoff (a batch that keeps timing
out is retried in halves); an unexpected exception is logged with its traceback and retried
the same way, not-ready meanwhile. Only two things stop a partition, each with one ERROR line,
a metric and a /readyz reason: a dead letter the dead-letter topic refuses for good, and a
stored offset outside the partition's log with LEDGER_OFFSET_RESET=fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from consumer.batch import Applied, Decoded, Record, apply_isolating, decode_records
from consumer.dlq import DeadLetter, DeadLetterQueue
from consumer.errors import (
    BatchAbandoned,
    BatchTooSlow,
    DeadLetterRefusedError,
    DeadLetterUnavailableError,
    FencedError,
    TransientError,
    UnexpectedError,
    database_away,
)
from consumer.health import Readiness
from consumer.lag import PartitionEnds, held_partitions
from consumer.logs import fields
from consumer.metrics import LedgerMetrics
from consumer.outages import Outage
from consumer.retry import Backoff, as_transient, retry_transient
from consumer.settings import Settings
from consumer.store import (
    OffsetMove,
    advance_offsets,
    load_offsets,
    reset_offsets,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
BATCH_BACKOFF = Backoff(initial=0.1, maximum=5.0)
IDLE_SYNC_SECONDS = 2.0
MIRROR_SECONDS = 2.0  # the offset mirror is best-effort: never longer than this
PROBE_SECONDS = 5.0  # while the broker seems down, ask it for metadata this often
TIMEOUTS_BEFORE_HALVING = 2


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
        self._opening: set[int] = set()  # assigned, paused, not yet sought to stored offsets
        self._last_sync = time.monotonic()
        self._last_probe = 0.0
        self.database = Outage("database")
        self.kafka = Outage("Kafka")
        self._mirror = Outage("Kafka offset mirror")

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
        """Take newly assigned partitions: paused until the run loop has sought them to the
        offsets stored in PostgreSQL (_open_pending).

        Not here: aiokafka awaits this listener inside the group join, so waiting on a database
        that is away would outlast the rebalance and get this member evicted."""
        self.metrics.rebalances.inc()
        mine = [tp for tp in assigned if tp.topic == self.settings.topic]
        self.consumer.pause(*mine)
        self._opening.update(tp.partition for tp in mine)

    async def close(self, revoked: Sequence[TopicPartition]) -> None:
        """Give partitions up only once the batch in flight has committed or been abandoned."""
        self._revoking = True
        try:
            async with self._batch_lock:
                for tp in revoked:
                    self._opening.discard(tp.partition)
                    self.positions.pop(tp.partition, None)
                    if tp.partition in self._lag_partitions:
                        self._lag_partitions.discard(tp.partition)
                        self.metrics.consumer_lag.remove(str(tp.partition))
                    # Its owner now judges it (and meets the same cause, if it lasts).
                    if self.readiness.halted.pop(tp.partition, None) is not None:
                        self.metrics.halted_partitions.remove(str(tp.partition))
        finally:
            self._revoking = False
        self.readiness.assigned = frozenset(self.positions)
        log.info(
            "partitions revoked", extra=fields(partitions=sorted(tp.partition for tp in revoked))
        )

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume until stopped (or, with until_idle, until every partition is caught up or
        stopped: `halted` says which stopped, and why)."""
        failures = 0
        while not self._stop.is_set():
            try:
                if self._opening:
                    async with self._batch_lock:
                        await self._open_pending()
                records = await self._fetch()
                async with self._batch_lock:
                    if records:
                        await self.put(records)
                    caught_up = await self._update_lag()
                self.readiness.unexpected = None
                failures = 0
            except Exception as error:
                failures += 1
                log.exception(
                    "unexpected error in the consumer loop",
                    extra=fields(error=type(error).__name__),
                )
                self.readiness.unexpected = f"unexpected {type(error).__name__}"
                await asyncio.sleep(self.backoff.delay(failures))
                continue
            if records:  # the broker answered: whatever aiokafka logged, it is reachable
                self.kafka.recovered()
                self.readiness.kafka_ok = True
                continue
            await self._probe_kafka()
            if until_idle and caught_up:
                log.info("caught up: every assigned partition is at its last stable offset")
                return
            if time.monotonic() - self._last_sync > IDLE_SYNC_SECONDS:
                async with self._batch_lock:
                    await self._follow_stored_offsets()

    async def _open_pending(self) -> None:
        """Seek the partitions open() took to their stored offsets, then let them fetch.

        Retried while the database is away; abandoned when they are revoked or on stop."""
        opening = sorted(self._opening)
        try:
            stored = await self._load_offsets(opening)
        except BatchAbandoned:
            return  # close() or stop() takes it from here
        tps = [TopicPartition(self.settings.topic, p) for p in opening]
        await self._seek(tps, stored)
        for partition in opening:
            self.positions[partition] = stored.get(partition)
            self._opening.discard(partition)
        self.readiness.assigned = frozenset(self.positions)
        halted = self.readiness.halted
        self.consumer.resume(*[tp for tp in tps if tp.partition not in halted])
        log.info(
            "partitions assigned",
            extra=fields(partitions=opening, stored_offsets=stored),
        )

    async def _fetch(self) -> list[Record]:
        try:
            batch = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.max_batch)
        except OffsetOutOfRangeError as error:
            async with self._batch_lock:
                await self._offsets_out_of_range(error.args[0] if error.args else {})
            return []
        except NoOffsetForPartitionError:
            # A fetch that raced the assignment, before open() sought the partition to the
            # stored offset (the start never depends on Kafka's group offsets).
            return []
        return sorted(
            (r for rs in batch.values() for r in rs), key=lambda r: (r.partition, r.offset)
        )

    async def put(self, records: list[Record]) -> bool:
        """Apply records, or dead-letter them; never raise because of them. False when the
        batch was not committed (fenced, abandoned): its partitions were rewound."""
        owned = [r for r in records if self._expects(r)]
        while owned:
            try:
                return await self._put(owned)
            except DeadLetterRefusedError as refused:
                # Nothing of those partitions was committed: stop them where they stand,
                # and go on with the others.
                await self._halt(refused.partitions, f"dead letter refused: {refused.reason}")
                owned = [r for r in owned if r.partition not in refused.partitions]
            except BatchTooSlow:
                middle = len(owned) // 2
                log.warning(
                    "batch keeps timing out: committing it in halves",
                    extra=fields(records=len(owned), first=middle),
                )
                # Sorted by (partition, offset): per partition, each half starts where the
                # previous one ended, so the second goes only after the first committed.
                if not await self.put(owned[:middle]):
                    # Nothing of the second half was committed: its partitions are fetched
                    # again from where the ledger stands, not from past it.
                    await self._rewind(owned[middle:], reload=True)
                    return False
                # A partition the first half stopped keeps its records where they stand.
                owned = [r for r in owned[middle:] if self._expects(r)]
        return True

    async def _put(self, owned: list[Record]) -> bool:
        started = time.monotonic()
        splittable = len(owned) > 1
        try:
            decoded = await self._with_retry(lambda: self._decode(owned))
            letters = decoded.letters
            await self._with_retry(lambda: self.dlq_report(letters))  # 1
            applied = await self._with_retry(
                lambda: self._commit(owned, decoded), splittable=splittable
            )  # 2
        except FencedError as fenced:
            self.metrics.fenced_batches.inc()
            log.warning("batch fenced", extra=fields(partitions=fenced.partitions))
            await self._rewind(owned, reload=True)
            return False
        except BatchAbandoned:
            log.warning("batch abandoned", extra=fields(records=len(owned)))
            await self._rewind(owned, reload=False)
            return False
        await self._mirror_offsets()  # 3
        self._observe(applied, letters, len(owned), time.monotonic() - started)  # 4
        return True

    def _expects(self, record: Record) -> bool:
        """Owned, running, and not below the offset this owner has committed: a fetch issued
        before a seek can hand back records that are already in the ledger."""
        if record.partition not in self.positions or record.partition in self.readiness.halted:
            return False
        position = self.positions[record.partition]
        return position is None or record.offset >= position

    async def stop(self) -> None:
        self.request_stop()
        await self._batch_lock.acquire()  # wait for the batch in flight
        self._batch_lock.release()

    # -- steps ---------------------------------------------------------------------------------

    async def _decode(self, records: list[Record]) -> Decoded:
        return decode_records(
            records,
            max_bytes=self.settings.max_event_bytes,
            max_future_skew=self.settings.future_skew,
        )

    async def dlq_report(self, letters: Sequence[DeadLetter]) -> None:
        await self.dlq.report(letters)

    async def _commit(self, records: list[Record], decoded: Decoded) -> Applied:
        moves = self._moves(records)
        applied = Applied()
        try:
            conn = await self.pool.acquire()
        except TimeoutError as error:  # no connection: not a batch too big for its timeout
            raise TransientError("database unreachable: connecting timed out") from error
        try:
            async with conn.transaction():
                await advance_offsets(
                    conn, self.settings.group_id, self.settings.topic, moves
                )  # 2a
                await apply_isolating(
                    conn, list(zip(decoded.events, decoded.records, strict=True)), applied
                )  # 2b
                await self.dlq_report(applied.letters)  # 2c
        finally:
            await self.pool.release(conn)
        for move in moves:
            self.positions[move.partition] = move.next_offset
        self.readiness.progressed()
        return applied

    def _moves(self, records: list[Record]) -> list[OffsetMove]:
        last: dict[int, int] = {}
        for record in records:
            last[record.partition] = max(last.get(record.partition, -1), record.offset)
        return [
            OffsetMove(partition, self.positions[partition], offset + 1)
            for partition, offset in sorted(last.items())
        ]

    async def _with_retry(
        self, operation: Callable[[], Awaitable[T]], *, splittable: bool = False
    ) -> T:
        """Retry transient failures, and unexpected ones, with capped backoff; fetching stays
        paused while it waits, whatever it runs for (a batch, loading offsets on assignment,
        following stored offsets when idle). A batch that keeps timing out (statement_timeout,
        a client timeout) raises BatchTooSlow when it can be split."""
        paused: list[TopicPartition] = []
        timeouts = 0

        async def attempt() -> T:
            try:
                result = await operation()
            except (FencedError, BatchAbandoned, BatchTooSlow, DeadLetterRefusedError):
                raise
            except Exception as error:
                if as_transient(error) is not None:
                    raise
                log.exception(
                    "unexpected error: the batch will be retried",
                    extra=fields(error=type(error).__name__),
                )
                raise UnexpectedError(f"unexpected {type(error).__name__}") from error
            self.readiness.unexpected = None
            self.database.recovered()
            self.readiness.database_ok = True
            return result

        def on_retry(error: TransientError, attempt: int, delay: float) -> None:
            nonlocal timeouts
            if self._revoking or self._stop.is_set():
                raise BatchAbandoned from error
            if isinstance(error, UnexpectedError):
                self.readiness.unexpected = str(error)
                self.metrics.db_retries.labels("unexpected").inc()
            elif not isinstance(error, DeadLetterUnavailableError):
                if database_away(error):
                    self.readiness.database_ok = False
                    self.database.failing(str(error))
                self.metrics.db_retries.labels(error.sqlstate or "unavailable").inc()
            else:
                self.kafka.failing(str(error))
            timeouts = timeouts + 1 if error.timed_out else 0
            if splittable and timeouts >= TIMEOUTS_BEFORE_HALVING:
                raise BatchTooSlow from error
            if not paused:
                paused.extend(self.consumer.assignment())
                self.consumer.pause(*paused)
            log.debug(
                "transient failure, retrying",
                extra=fields(error=str(error), attempt=attempt, delay_seconds=round(delay, 2)),
            )

        try:
            return await retry_transient(attempt, self.backoff, on_retry)
        finally:
            halted = self.readiness.halted
            if still := [
                tp
                for tp in paused
                if tp in self.consumer.assignment()
                and tp.partition not in halted
                and tp.partition not in self._opening  # resumed once sought
            ]:
                self.consumer.resume(*still)

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
        """Best-effort and bounded: without a group coordinator the commit would wait, and hold
        the ledger and a shutdown with it."""
        offsets = {
            TopicPartition(self.settings.topic, p): offset
            for p, offset in self.positions.items()
            if offset is not None
        }
        try:
            async with asyncio.timeout(MIRROR_SECONDS):
                await self.consumer.commit(offsets)
        except (KafkaError, TimeoutError) as error:  # lag tooling only: PostgreSQL holds the truth
            self._mirror.failing(f"skipped: {type(error).__name__}")
        else:
            self._mirror.recovered()

    async def _probe_kafka(self) -> None:
        """While aiokafka reports trouble reaching the broker, ask it for metadata now and then:
        the answer is what ends the outage (for the log and /readyz)."""
        now = time.monotonic()
        self.readiness.kafka_ok = not self.kafka.down
        if not self.kafka.down or now - self._last_probe < PROBE_SECONDS:
            return
        self._last_probe = now
        try:
            async with asyncio.timeout(PROBE_SECONDS / 2):
                await self.consumer.topics()
        except (KafkaError, TimeoutError) as error:
            self.kafka.failing(type(error).__name__)
        else:
            self.kafka.recovered()
        self.readiness.kafka_ok = not self.kafka.down

    async def _halt(self, partitions: Sequence[int], reason: str) -> None:
        """Stop these partitions where the ledger stands: nothing past the stored offset is
        applied or skipped until the cause is fixed and the consumer restarted."""
        for partition in partitions:
            log.error(
                "partition stopped",
                extra=fields(
                    partition=partition, stored_offset=self.positions.get(partition), reason=reason
                ),
            )
            self.readiness.halted[partition] = reason
            self.metrics.halted_partitions.labels(str(partition)).set(1)
        tps = [TopicPartition(self.settings.topic, p) for p in partitions]
        owned = [tp for tp in tps if tp in self.consumer.assignment()]
        self.consumer.pause(*owned)
        await self._seek(
            owned, {p: o for p in partitions if (o := self.positions.get(p)) is not None}
        )

    async def _offsets_out_of_range(self, out_of_range: dict[TopicPartition, int]) -> None:
        """A stored offset outside the partition's log (topic recreated, retention passed,
        unclean election): never skipped silently."""
        for tp, offset in sorted(out_of_range.items()):
            if tp.partition not in self.positions or tp.partition in self.readiness.halted:
                continue
            start = (await self.consumer.beginning_offsets([tp]))[tp]
            end = (await self.consumer.end_offsets([tp]))[tp]
            self.metrics.offset_resets.labels(str(tp.partition)).inc()
            detail = f"stored offset {offset} is outside the log [{start}, {end})"
            if self.settings.offset_reset == "fail":
                await self._halt([tp.partition], f"offset out of range: {detail}")
                continue
            log.error(
                "offset out of range: resuming from the log start (LEDGER_OFFSET_RESET=earliest)",
                extra=fields(partition=tp.partition, offset=offset, log_start=start, log_end=end),
            )
            expected = self.positions[tp.partition]

            async def move(
                partition: int = tp.partition, expected: int | None = expected, to: int = start
            ) -> None:
                async with self.pool.acquire() as conn:
                    await reset_offsets(
                        conn, self.settings.group_id, self.settings.topic, partition, expected, to
                    )

            try:
                await self._with_retry(move)
            except FencedError:  # someone else moved it meanwhile (replay, a new owner)
                await self._follow_stored_offsets()
                continue
            except BatchAbandoned:
                return  # stopping, or giving the partition up, while the database is away
            self.positions[tp.partition] = start
            self.consumer.seek(tp, start)

    async def _update_lag(self) -> bool:
        """Refresh lag, records held by open transactions and readiness; True when every
        assigned partition is caught up: at its last stable offset, the end of what a
        read_committed consumer can read (consumer/lag.py)."""
        ends: dict[int, PartitionEnds] = {}
        caught_up = bool(self.positions) and not self._opening
        for partition in sorted(set(self.positions) - set(self.readiness.halted)):
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
            undecodable=[letter.event_type for letter in decode_letters],
            dead_letter_reasons=[letter.reason.value for letter in letters],
            usage_changes=[change for plan in applied.plans for change in plan.usage_changes],
        )
        log.debug(
            "batch committed",
            extra=fields(records=records, seconds=round(seconds, 4), dead_letters=len(letters)),
        )
