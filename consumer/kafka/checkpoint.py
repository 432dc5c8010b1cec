"""Where each partition stands: the stored offsets in PostgreSQL are the truth, Kafka's
positions follow them.

- open: newly assigned partitions are paused and pending; `open_pending` (run by the loop, not
  by aiokafka's listener) loads their stored offsets with retry, seeks, and resumes them.
- expects / moves: which fetched records this owner may apply, and the compare-and-set moves
  (from the offset it expects to the next one) that its batch transaction makes.
- committed / rewind: after a batch, the new positions; after a rolled-back one, a seek back
  to where the ledger stands (reloaded when another owner moved it).
- follow: when idle, offsets moved by someone else (`token-ledger replay`, a new owner).
- mirror: the positions to Kafka, for lag tooling only, best-effort and bounded.
- halt / out of range: a partition stopped where the ledger stands, never skipped silently.

Every seek bumps `generation`: a batch fetched before it may hold records from the old
positions, and is rewound instead of applied (consumer/kafka/pipeline.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumer.errors import BatchAbandoned, FencedError
from consumer.http.metrics import LedgerMetrics
from consumer.ledger.batch import Record
from consumer.ledger.offsets import (
    OffsetMove,
    clear_halts,
    load_offsets,
    record_halts,
    reset_offsets,
)
from consumer.logs import fields
from consumer.retry import Retrier
from consumer.settings import Settings
from consumer.status import Outage, Readiness

log = logging.getLogger(__name__)
MIRROR_SECONDS = 2.0  # the offset mirror is best-effort: never longer than this
# Recording a halt is one attempt, bounded: the partition stops whether or not it is recorded,
# and a database that hangs must not hold the other partitions.
HALT_RECORD_SECONDS = 5.0


class Checkpoints:
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        pool: asyncpg.Pool,
        metrics: LedgerMetrics,
        readiness: Readiness,
        retry: Retrier,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.pool = pool
        self.metrics = metrics
        self.readiness = readiness
        self.retry = retry
        # partition -> the stored next_offset this owner's next batch starts from (None: no row)
        self.positions: dict[int, int | None] = {}
        self.opening: set[int] = set()  # assigned, paused, not yet sought to stored offsets
        self.generation = 0  # bumped by every seek
        self._mirror = Outage("Kafka offset mirror")
        self._mirroring: asyncio.Task[None] | None = None
        self._mirror_wanted = False

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.settings.topic, partition)

    # -- assignment ----------------------------------------------------------------------------

    def open(self, assigned: Sequence[TopicPartition]) -> None:
        """Take newly assigned partitions: paused until `open_pending` has sought them.

        Not in aiokafka's listener: it awaits the listener inside the group join, so waiting
        on a database that is away would outlast the rebalance and get this member evicted."""
        mine = [tp for tp in assigned if tp.topic == self.settings.topic]
        self.consumer.pause(*mine)
        self.opening.update(tp.partition for tp in mine)

    async def open_pending(self) -> None:
        """Seek the partitions `open` took to their stored offsets, then let them fetch.

        Retried while the database is away; abandoned when they are revoked or on stop."""
        opening = sorted(self.opening)
        try:
            stored = await self.load(opening, judge_afresh=True)
        except BatchAbandoned:
            return  # close() or stop() takes it from here
        tps = [self._tp(p) for p in opening]
        await self.seek(tps, stored)
        for partition in opening:
            self.positions[partition] = stored.get(partition)
            self.opening.discard(partition)
        self.readiness.assigned = frozenset(self.positions)
        halted = self.readiness.halted
        self.consumer.resume(*[tp for tp in tps if tp.partition not in halted])
        log.info("partitions assigned", extra=fields(partitions=opening, stored_offsets=stored))
        await self.mirror_now()  # Kafka's group view shows where the ledger stands from the start

    def close(self, revoked: Sequence[TopicPartition]) -> None:
        """Forget revoked partitions (the caller waited for the batch in flight)."""
        for tp in revoked:
            self.opening.discard(tp.partition)
            self.positions.pop(tp.partition, None)
        self.readiness.assigned = frozenset(self.positions)

    # -- batches -------------------------------------------------------------------------------

    def expects(self, record: Record) -> bool:
        """Owned, running, and not below the offset this owner has committed: a fetch issued
        before a seek can hand back records that are already in the ledger."""
        if record.partition not in self.positions or record.partition in self.readiness.halted:
            return False
        position = self.positions[record.partition]
        return position is None or record.offset >= position

    def moves(self, records: Sequence[Record]) -> list[OffsetMove]:
        last: dict[int, int] = {}
        for record in records:
            last[record.partition] = max(last.get(record.partition, -1), record.offset)
        return [
            OffsetMove(partition, self.positions[partition], offset + 1)
            for partition, offset in sorted(last.items())
        ]

    def committed(self, moves: Sequence[OffsetMove]) -> None:
        for move in moves:
            self.positions[move.partition] = move.next_offset

    async def load(self, partitions: list[int], *, judge_afresh: bool = False) -> dict[int, int]:
        """The stored offsets; `judge_afresh` (on assignment): the recorded halts of these
        partitions go too, unless this process still holds one stopped."""
        group, topic = self.settings.group_id, self.settings.topic

        async def load() -> dict[int, int]:
            async with self.pool.acquire() as conn:
                if judge_afresh:
                    running = [p for p in partitions if p not in self.readiness.halted]
                    await clear_halts(conn, group, topic, running)
                return await load_offsets(conn, group, topic, partitions)

        return await self.retry(load)

    async def seek(self, partitions: Sequence[TopicPartition], stored: dict[int, int]) -> None:
        self.generation += 1
        for tp in partitions:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:  # nothing applied yet: the database, not Kafka's group offset, decides
                await self.consumer.seek_to_beginning(tp)

    async def rewind(self, records: Sequence[Record], *, reload: bool) -> None:
        """After a rolled-back (or discarded) batch, fetch its partitions again from where the
        ledger stands.

        Fenced: another owner moved the stored offsets, so read them. Abandoned, discarded:
        nothing was committed, so the offsets this owner expects still hold (and the database
        may be down)."""
        partitions = sorted({r.partition for r in records} & set(self.positions))
        expected = {p: self.positions[p] for p in partitions}
        if reload:
            try:
                stored = await self.load(partitions)
                expected = {p: stored.get(p) for p in partitions}
            except BatchAbandoned:
                pass  # shutting down or giving the partitions up while the database is away
        self.positions.update(expected)
        await self.seek(
            [self._tp(p) for p in partitions],
            {p: offset for p, offset in expected.items() if offset is not None},
        )

    async def follow(self) -> None:
        """When idle, pick up offsets moved by someone else (`token-ledger replay`, a new owner)."""
        try:
            stored = await self.load(sorted(self.positions))
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
        await self.seek([self._tp(p) for p in moved], stored)
        await self.mirror_now()  # Kafka's group view moves with them (e.g. back, after a replay)

    def mirror_soon(self) -> None:
        """Mirror the positions in the background: a batch's commit does not wait on Kafka's
        group coordinator (a round trip per batch, ~4 % of a drain). One commit at a time;
        positions that move meanwhile go with the next. `mirrored` waits for it."""
        self._mirror_wanted = True
        if self._mirroring is None or self._mirroring.done():
            self._mirroring = asyncio.create_task(self._mirror_while_wanted())

    async def _mirror_while_wanted(self) -> None:
        while self._mirror_wanted:
            self._mirror_wanted = False
            try:
                await self.mirror()
            except Exception as error:  # lag tooling only: never the ledger's failure
                log.exception("the offset mirror failed", extra=fields(error=type(error).__name__))
                self._mirror.failing(f"failed: {type(error).__name__}")

    async def mirror_now(self) -> None:
        """Mirror and wait, after any mirror in the background: never an older view last."""
        self.mirror_soon()
        await self.mirrored()

    async def mirrored(self) -> None:
        """Wait for the background mirror: before partitions are given up, and on stop, Kafka's
        group view shows where the ledger stands. At most MIRROR_SECONDS in all, however many
        commits are queued: a coordinator that does not answer holds a rebalance or a stop no
        longer than it held a batch."""
        try:
            async with asyncio.timeout(MIRROR_SECONDS):
                while self._mirroring is not None and not self._mirroring.done():
                    await asyncio.shield(self._mirroring)
        except TimeoutError:
            self._mirror.failing("skipped: TimeoutError")
            if self._mirroring is not None:
                self._mirroring.cancel()
                # Until it has ended (wait() never raises the task's cancellation, only ours).
                await asyncio.wait([self._mirroring])

    async def mirror(self) -> None:
        """Best-effort and bounded: without a group coordinator the commit would wait, and hold
        the ledger and a shutdown with it."""
        offsets = {
            self._tp(p): offset for p, offset in self.positions.items() if offset is not None
        }
        if not offsets:  # nothing stored yet (aiokafka refuses an empty commit)
            return
        try:
            async with asyncio.timeout(MIRROR_SECONDS):
                await self.consumer.commit(offsets)
        except (KafkaError, TimeoutError) as error:  # lag tooling only: PostgreSQL holds the truth
            self._mirror.failing(f"skipped: {type(error).__name__}")
        else:
            self._mirror.recovered()

    # -- stopped partitions --------------------------------------------------------------------

    async def halt(self, partitions: Sequence[int], reason: str) -> None:
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
        await self._record_halts(partitions, reason)
        owned = [tp for tp in map(self._tp, partitions) if tp in self.consumer.assignment()]
        self.consumer.pause(*owned)
        await self.seek(
            owned, {p: o for p in partitions if (o := self.positions.get(p)) is not None}
        )

    async def _record_halts(self, partitions: Sequence[int], reason: str) -> None:
        """Into partition_halts, for `token-ledger status`. Not retried: the halt holds in this
        process whatever happens here, and the next owner judges the partition afresh."""
        try:
            async with asyncio.timeout(HALT_RECORD_SECONDS), self.pool.acquire() as conn:
                await record_halts(
                    conn, self.settings.group_id, self.settings.topic, partitions, reason
                )
        except Exception as error:  # noqa: BLE001 - any failure: said, and the halt still holds
            log.warning(
                "could not record the stopped partitions: `token-ledger status` will not show"
                " them (/readyz does)",
                extra=fields(
                    partitions=sorted(partitions), error=f"{type(error).__name__}: {error}"
                ),
            )

    async def out_of_range(self, out_of_range: dict[TopicPartition, int]) -> None:
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
                await self.halt([tp.partition], f"offset out of range: {detail}")
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
                await self.retry(move)
            except FencedError:  # someone else moved it meanwhile (replay, a new owner)
                await self.follow()
                continue
            except BatchAbandoned:
                return  # stopping, or giving the partition up, while the database is away
            self.positions[tp.partition] = start
            self.generation += 1
            self.consumer.seek(tp, start)
