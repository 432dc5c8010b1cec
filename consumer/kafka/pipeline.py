"""The Kafka loop, in Kafka Connect SinkTask verbs: open(partitions), put(batch),
close(partitions), stop(). Where partitions stand is checkpoint.py; what one batch does in the
database is consumer/ledger/batch.py; the loop is assembled and opened by assembly.py.

One batch, in one direction:
  1. take records (intake.py) and decode every record (while the previous batch's transaction
     is in flight), but those this group applied before (ledger/applied.py): a redelivery
     costs one lookup per take
  2. one transaction (batch.commit_batch), retried with capped backoff on transient failures
     (fetching paused): offsets by compare-and-set, load state, reduce, write, dead letters
     (what could not be decoded or written; acked before COMMIT, none sent twice per group)
  3. mirror the new offsets to Kafka (for lag tooling only, bounded, in the background: the
     next batch does not wait for it; PostgreSQL is the truth)
  4. metrics

Stages overlap: batch N+1 is fetched and decoded while batch N's transaction runs, so the
database and the decoder work at the same time; what Kafka receives meanwhile joins N+1 too
(within the batch bounds), so a record waits for one transaction before its own, not two.
Batch N+1 is applied only after N committed, with offsets moved from where N left them; if N
was fenced, abandoned or failed, or anything sought a partition meanwhile, N+1 is discarded
and its partitions fetched again from where the ledger stands.

The stored offsets are the source of truth: on assignment the consumer seeks to them, and a
fenced batch re-seeks to them. A rebalance waits for the batch in flight (or abandons it if it
is stuck retrying), so a partition is never committed after it was given up.

No record and no database answer ends the process (docs/operations.md#when-things-fail): a
record is applied or dead-lettered; transient and unexpected failures retry the batch with
backoff (consumer/retry.py; one that keeps timing out is retried in halves). Only a dead letter
refused for good and a stored offset outside the log (LEDGER_OFFSET_RESET=fail) stop a
partition (checkpoint.halt).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from consumer.errors import BatchAbandoned, BatchTooSlow, DeadLetterRefusedError, FencedError
from consumer.http.metrics import LedgerMetrics
from consumer.kafka.checkpoint import Checkpoints
from consumer.kafka.dead_letters import DeadLetterQueue
from consumer.kafka.intake import Intake
from consumer.kafka.lag import Lag
from consumer.kafka.outages import KafkaProbe
from consumer.kafka.waiting import IdleClock
from consumer.ledger.applied import Position
from consumer.ledger.batch import Applied, Decoded, Decoding, Record, Report, decode_in_slices
from consumer.ledger.offsets import OffsetMove
from consumer.logs import fields
from consumer.retry import Retrier
from consumer.settings import Settings
from consumer.status import Readiness, RetryStatus

log = logging.getLogger(__name__)
IDLE_SYNC_SECONDS = 2.0
# While a transaction is in flight, how often the next batch takes what Kafka buffered. Each
# take costs a fetch and a lookup (~0.5 ms of this thread): every 5 ms cost ~16 % more CPU
# per event at 5,000 events/s; every 20 ms, none measurable (docs/design.md).
GATHER_SECONDS = 0.02
# The batch transaction: (offset moves, decoded records, dead-letter report) -> what it did.
Commit = Callable[[Sequence[OffsetMove], Decoded, Report], Awaitable[Applied]]
# The records of a batch this group applied before, by position, with their stored entries.
Recognise = Callable[[Sequence[Record]], Awaitable[Mapping[Position, bytes]]]


async def recognise_nothing(records: Sequence[Record]) -> Mapping[Position, bytes]:
    return {}


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dlq: DeadLetterQueue,
        metrics: LedgerMetrics,
        readiness: Readiness,
        checkpoints: Checkpoints,
        retry: Retrier,
        status: RetryStatus,
        commit: Commit,
        recognise: Recognise = recognise_nothing,
    ) -> None:
        self.settings = settings
        self.recognise = recognise
        self.consumer = consumer
        self.dlq = dlq
        self.metrics = metrics
        self.readiness = readiness
        self.checkpoints = checkpoints
        self.retry = retry
        self.commit = commit
        self.kafka = status.kafka
        self.revoking = False
        self._stop = asyncio.Event()
        self._caught_up = False  # run(until_idle=True) returned: every partition caught up
        self._batch_lock = asyncio.Lock()
        self._inflight: asyncio.Task[bool] | None = None
        self._stale: list[Record] = []  # fetched but never applied: fetched again
        self.lag = Lag(consumer, settings.topic, checkpoints, metrics, readiness)
        self._last_sync = time.monotonic()
        self._probe = KafkaProbe(consumer, self.kafka, readiness)
        self.idle = IdleClock(metrics.idle_seconds)
        self.intake = Intake(settings, consumer, self.lag, self.idle)
        self.gather_seconds = GATHER_SECONDS

    def request_stop(self) -> None:
        """Stop taking work; the batch in flight still commits."""
        if not self._stop.is_set():
            log.info("stop requested: finishing the batch in flight")
            self._stop.set()

    # -- SinkTask verbs ------------------------------------------------------------------------

    async def open(self, assigned: Sequence[TopicPartition]) -> None:
        self.metrics.rebalances.inc()
        self.checkpoints.open(assigned)

    async def close(self, revoked: Sequence[TopicPartition]) -> None:
        """Give partitions up only once the batch in flight has committed or been abandoned."""
        self.revoking = True
        try:
            async with self._batch_lock:
                await self.checkpoints.mirrored()
                self.checkpoints.close(revoked)
                self.lag.forget(tp.partition for tp in revoked)
                for tp in revoked:
                    # Its owner now judges it (and meets the same cause, if it lasts).
                    if self.readiness.halted.pop(tp.partition, None) is not None:
                        self.metrics.halted_partitions.remove(str(tp.partition))
        finally:
            self.revoking = False
        log.info(
            "partitions revoked", extra=fields(partitions=sorted(tp.partition for tp in revoked))
        )

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume until stopped (or, with until_idle, until every partition is caught up or
        stopped: `halted` says which stopped, and why)."""
        failures = 0
        try:
            while not self._stop.is_set():
                records: list[Record] = []
                caught_up = False
                carried = bool(self.intake.carry)  # the next batch is in memory: no fetch
                try:
                    await self._prepare_partitions()
                    generation = self.checkpoints.generation  # before the fetch: see _step
                    carried = carried and bool(self.intake.carry)
                    records = await self._fetch(generation)
                    caught_up = await self._step(records, generation)
                    self.readiness.unexpected = None
                    failures = 0
                except Exception as error:
                    self._stale.extend(records)
                    failures += 1
                    log.exception(
                        "unexpected error in the consumer loop",
                        extra=fields(error=type(error).__name__),
                    )
                    self.readiness.unexpected = f"unexpected {type(error).__name__}"
                    await asyncio.sleep(self.retry.backoff.delay(failures))
                    continue
                if records:
                    if not carried:  # the broker answered: whatever aiokafka logged, it is up
                        self.kafka.recovered()
                        self.readiness.kafka_ok = True
                    continue
                await self._probe()
                if until_idle and caught_up:
                    self._caught_up = True
                    log.info(
                        "caught up: every assigned partition is at its last stable offset",
                        extra=fields(**self.idle.summary()),
                    )
                    return
                if time.monotonic() - self._last_sync > IDLE_SYNC_SECONDS:
                    self._last_sync = time.monotonic()
                    async with self._batch_lock:
                        await self.checkpoints.follow()
        except asyncio.CancelledError:
            # Cancelled (a stop whose batch hangs on the database): the batch in flight runs
            # in its own task, so it is cancelled with us, uncommitted.
            if self._inflight is not None:
                self._inflight.cancel()
            raise
        await self._settle(quietly=True)

    async def _prepare_partitions(self) -> None:
        """Before fetching: seek newly assigned partitions, and those whose fetched records
        were never applied."""
        seeking = bool(self._stale or self.checkpoints.opening)
        self._stale.extend(self.intake.stale_carry(self.checkpoints.generation, seeking=seeking))
        if self.checkpoints.opening or self._stale:
            await self._settle()
            async with self._batch_lock:
                if self._stale:
                    # Forgotten only once sought: a seek that fails leaves them for the next
                    # pass, never a partition fetched on from past them.
                    stale = list(self._stale)
                    await self.checkpoints.rewind(stale, reload=False)
                    del self._stale[: len(stale)]
                if self.checkpoints.opening:
                    await self.checkpoints.open_pending()

    async def _step(self, records: list[Record], generation: int) -> bool:
        """Decode the fetched batch while the previous one commits, adding what Kafka buffers
        meanwhile, then hand it on; True when nothing was fetched and every partition is
        caught up. `generation`: the checkpoints' when the fetch began; a seek since means the
        records may come from old positions."""
        decoded: Decoded | None = None
        discard = False
        if records:  # 1, beside the commit
            decoding = await self._decode(records)
            with self.idle.waiting_on("postgres"):  # less what gathering takes of this thread
                discard = await self._gather(records, decoding, generation)
            decoded = decoding.decoded
        with self.idle.waiting_on("postgres"):
            committed = await self._settle()
        if decoded is None:
            async with self._batch_lock:
                return await self.lag.update()
        if discard or not committed or generation != self.checkpoints.generation:
            self._stale.extend(records)  # fetched from positions that no longer hold
            return False
        if self._stop.is_set():  # asked while the last batch committed: start no other
            self._stale.extend(records)
            return False
        self._inflight = asyncio.create_task(self._put_prepared(records, decoded))
        return False

    async def _gather(self, records: list[Record], decoding: Decoding, generation: int) -> bool:
        """While the batch in flight commits, every GATHER_SECONDS, add what Kafka buffered
        meanwhile to `records` (in place: whatever happens next, the caller holds every record
        taken) and decode it. True: discard the batch (fetched again from the stored offsets)."""
        inflight = self._inflight
        while inflight is not None and not self.intake.full():
            await asyncio.wait([inflight], timeout=self.gather_seconds)
            if inflight.done() or self._stop.is_set():
                return False
            if generation != self.checkpoints.generation:
                return False  # taken across a seek: discarded once the batch in flight settles
            try:
                more = await self.intake.more(generation)
            except OffsetOutOfRangeError:
                # Met at the fetch position, past this batch: only the stored offset, where
                # the batch is fetched again from, may be judged (_fetch does, if it still is).
                return True
            records.extend(more)
            await self._decode(more, into=decoding)
        return False

    async def _settle(self, *, quietly: bool = False) -> bool:
        """Wait for the batch in flight; whether it committed."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return True
        if quietly:
            try:
                return await inflight
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are cancelled, not just the batch (run() cancelled it)
                return False
            except Exception as error:  # stopping: nothing left to retry it
                log.exception(
                    "the batch in flight failed", extra=fields(error=type(error).__name__)
                )
                return False
        return await inflight

    async def _put_prepared(self, records: list[Record], decoded: Decoded) -> bool:
        try:
            async with self._batch_lock:
                committed = await self.put(records, decoded)
                await self.lag.update()
                return committed
        except Exception:
            self._stale.extend(records)  # never applied: fetched again, never skipped
            raise

    async def _fetch(self, generation: int) -> list[Record]:
        """The next batch (intake.py); a partition whose stored offset is outside the log is
        handled once the batch in flight settles."""
        try:
            return await self.intake.fetch(generation)
        except OffsetOutOfRangeError as error:
            await self._settle()
            async with self._batch_lock:
                await self.checkpoints.out_of_range(error.args[0] if error.args else {})
            return []

    async def put(self, records: list[Record], decoded: Decoded | None = None) -> bool:
        """Apply records, or dead-letter them; never raise because of them. False when the
        batch was not committed (fenced, abandoned): its partitions were rewound."""
        owned = [r for r in records if self.checkpoints.expects(r)]
        if len(owned) != len(records):
            decoded = None  # decoded for records some of which are not ours (any more)
        while owned:
            try:
                return await self._put(owned, decoded)
            except DeadLetterRefusedError as refused:
                # Nothing of those partitions was committed: stop them where they stand,
                # and go on with the others.
                await self.checkpoints.halt(
                    refused.partitions, f"dead letter refused: {refused.reason}"
                )
                owned = [r for r in owned if r.partition not in refused.partitions]
            except BatchTooSlow:
                middle = len(owned) // 2
                log.warning(
                    "batch keeps timing out: committing it in halves",
                    extra=fields(records=len(owned), first=middle),
                )
                # In offset order per partition (intake.py): per partition, each half starts
                # where the previous one ended, so the second goes only after the first
                # committed.
                if not await self.put(owned[:middle]):
                    # Nothing of the second half was committed: its partitions are fetched
                    # again from where the ledger stands, not from past it.
                    await self.checkpoints.rewind(owned[middle:], reload=True)
                    return False
                # A partition the first half stopped keeps its records where they stand.
                owned = [r for r in owned[middle:] if self.checkpoints.expects(r)]
            decoded = None
        return True

    async def _put(self, owned: list[Record], decoded: Decoded | None) -> bool:
        started = time.monotonic()
        try:
            ready = decoded if decoded is not None else (await self._decode(owned)).decoded  # 1
            applied = await self.retry(
                lambda: self._commit(owned, ready), splittable=len(owned) > 1
            )  # 2
        except FencedError as fenced:
            self.metrics.fenced_batches.inc()
            log.warning("batch fenced", extra=fields(partitions=fenced.partitions))
            await self.checkpoints.rewind(owned, reload=True)
            return False
        except BatchAbandoned:
            log.warning("batch abandoned", extra=fields(records=len(owned)))
            await self.checkpoints.rewind(owned, reload=False)
            return False
        self.checkpoints.mirror_soon()  # 3, in the background
        self._observe(applied, ready, len(owned), time.monotonic() - started)  # 4
        return True

    async def stop(self) -> None:
        if self._caught_up:  # `--until-idle` ended: nobody asked to stop, nothing is in flight
            self._stop.set()
        else:
            self.request_stop()
        await self._settle(quietly=True)
        await self._batch_lock.acquire()  # wait for the batch in flight
        self._batch_lock.release()
        await self.checkpoints.mirrored()

    # -- steps ---------------------------------------------------------------------------------

    async def _decode(self, records: list[Record], into: Decoding | None = None) -> Decoding:
        """Never raises for a record; in slices while a batch is in flight. Records this
        group applied before are recognised first and not decoded. `into`: a batch's decoding
        so far, these records added to it."""
        decoding = into or Decoding(
            max_bytes=self.settings.max_event_bytes, max_future_skew=self.settings.future_skew
        )
        if records:
            inflight = self._inflight
            await decode_in_slices(
                decoding,
                records,
                busy=lambda: inflight is not None and not inflight.done(),
                known=await self.recognise(records),
            )
        return decoding

    async def _commit(self, records: list[Record], decoded: Decoded) -> Applied:
        moves = self.checkpoints.moves(records)
        applied = await self.commit(moves, decoded, self.dlq.report)
        self.checkpoints.committed(moves)
        self.readiness.committed()
        return applied

    def _observe(self, applied: Applied, decoded: Decoded, records: int, seconds: float) -> None:
        self.metrics.observe_committed(applied, decoded, records=records, seconds=seconds)
        letters = len(decoded.letters) + len(applied.letters)
        log.debug(
            "batch committed",
            extra=fields(records=records, seconds=round(seconds, 4), dead_letters=letters),
        )
