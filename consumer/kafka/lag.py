"""How far behind a partition is, as a read_committed consumer sees it.

The ledger reads committed records only (`isolation_level="read_committed"`): a record of a
transaction that was aborted, or is still open, is never applied. A partition can then be read
up to its last stable offset (LSO): the first offset of its oldest open transaction, or the
high watermark when none is open. Commit and abort markers take an offset each, and aborted
batches stay in the log; aiokafka's fetcher steps `position()` over both when `getmany()` drains
a fetch (`PartitionRecords._unpack_records` sets `next_fetch_offset` past control and aborted
batches, and `FetchResult.getall` moves the position there even when it returns no record). So
a partition whose last offset is a marker ends at `LSO - position == 0`, although the offset
stored in PostgreSQL (last applied record + 1) may point at that marker.

Per partition:
- lag (`token_ledger_consumer_lag_records`): records readable now and not yet committed. While
  records fetched from a partition wait uncommitted (the next batch, decoded beside the
  transaction in flight, or a batch blocked on the database), it counts from the stored offset:
  `LSO - stored`; once everything fetched is committed, from the position: `LSO - position`
  (which steps over markers the stored offset may point at). Lag that does not shrink is a
  stall (/readyz: "stalled"). The consumer refreshes it every second on its own
  (consumer/http/health.py), so a batch blocked on a lock still shows its records waiting.
- uncommitted (`token_ledger_uncommitted_records`) = high watermark - LSO: records nobody can
  read until a transaction ends (its own, and every record written after its first one, by any
  producer). Ordinary while chat services publish in transactions; it means trouble only when
  the LSO stands still: a producer that died inside a transaction holds the partition until the
  broker aborts it at the producer's transaction timeout. /readyz reports that, as its own
  reason, once the LSO has stood still below records for LEDGER_STALL_SECONDS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord

from consumer.status import Held, Readiness

POSITION_SECONDS = 0.5  # the readiness watch must not wait on a position being resolved

if TYPE_CHECKING:
    from consumer.http.metrics import LedgerMetrics
    from consumer.kafka.checkpoint import Checkpoints


@dataclass(frozen=True)
class PartitionEnds:
    position: int  # the next offset the consumer will fetch
    stable: int  # last stable offset
    highwater: int
    # Where counting starts: the stored offset while fetched records of the partition wait
    # uncommitted, else (None) the position (see the module docstring).
    counted_from: int | None = None

    @property
    def lag(self) -> int:
        start = self.position if self.counted_from is None else self.counted_from
        return max(0, self.stable - start)

    @property
    def uncommitted(self) -> int:
        return max(0, self.highwater - self.stable)


def counted_from(position: int, stored: int | None, fetched: tuple[int, int] | None = None) -> int:
    """The offset lag counts from. `fetched`: (first, last + 1) offsets fetched from the
    partition since it was last sought. While some of them are not committed, count from the
    stored offset (from the first fetched one when nothing is stored yet), else from the
    fetch position."""
    if fetched is not None:
        start = fetched[0] if stored is None else stored
        if fetched[1] > start:
            return min(start, position)
    return position


def held_partitions(
    previous: Mapping[int, Held], ends: Mapping[int, PartitionEnds], now: float
) -> dict[int, Held]:
    """The partitions with records above their LSO, each with since when its LSO stands there.

    A partition whose LSO moved starts over: a transaction ending is progress, however many
    others open after it. A partition not in `ends` (revoked, or not fetched yet) is dropped.
    """
    held = {}
    for partition, end in ends.items():
        if end.uncommitted == 0:
            continue
        before = previous.get(partition)
        since = before.since if before is not None and before.stable == end.stable else now
        held[partition] = Held(end.stable, end.uncommitted, since)
    return held


class Lag:
    """The lag gauges and readiness's view of them, refreshed by the loop after each batch
    and by the readiness watch every second (concurrently with a batch in flight: nothing
    here waits for the batch, and a partition revoked meanwhile is skipped).

    What was fetched is kept per partition since the last seek (any seek bumps the
    checkpoints' generation, and the pipeline fetches again whatever it had not committed)."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topic: str,
        checkpoints: Checkpoints,
        metrics: LedgerMetrics,
        readiness: Readiness,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.readiness = readiness
        self.reported: set[int] = set()  # partitions with a lag series
        # partition -> (first offset fetched, last offset fetched + 1), since `_generation`.
        self.fetched_range: dict[int, tuple[int, int]] = {}
        self._generation = checkpoints.generation

    def fetched(self, records: Iterable[ConsumerRecord], generation: int) -> None:
        """Records a fetch that began at checkpoints `generation` returned, sorted by
        (partition, offset); from before a seek, they are fetched again, so not counted."""
        if generation != self.checkpoints.generation:
            return
        self._since_last_seek()
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for record in records:
            first.setdefault(record.partition, record.offset)
            last[record.partition] = record.offset
        for partition, offset in last.items():
            low, high = self.fetched_range.get(partition, (first[partition], 0))
            self.fetched_range[partition] = (low, max(high, offset + 1))

    def forget(self, partitions: Iterable[int]) -> None:
        """Revoked: its owner reports it now."""
        for partition in partitions:
            self.fetched_range.pop(partition, None)
            if partition in self.reported:
                self.reported.discard(partition)
                self.metrics.consumer_lag.remove(str(partition))

    def _since_last_seek(self) -> None:
        if self._generation != self.checkpoints.generation:
            self._generation = self.checkpoints.generation
            self.fetched_range.clear()

    async def _ends(self, partition: int) -> PartitionEnds | None:
        """The partition's ends as this member sees them now; None when it cannot say (not
        assigned to it any more, not fetched yet, or its position not settled)."""
        tp = TopicPartition(self.topic, partition)
        if tp not in self.consumer.assignment():
            return None
        highwater, stable = self.consumer.highwater(tp), self.consumer.last_stable_offset(tp)
        # None until a fetch answered; -1 from a consumer that is not read_committed
        # (service.source_consumer always is): either way the end is unknown.
        if highwater is None or stable is None or stable < 0:
            return None
        try:
            # Sought explicitly, so valid at once; but a partition with nothing stored is
            # sought to its beginning, which aiokafka resolves with a request.
            async with asyncio.timeout(POSITION_SECONDS):
                position = await self.consumer.position(tp)
        except (TimeoutError, IllegalStateError):  # unsettled, or revoked while we waited
            return None
        if tp not in self.consumer.assignment() or partition not in self.checkpoints.positions:
            return None  # revoked meanwhile: the series must not come back
        start = counted_from(
            position, self.checkpoints.positions[partition], self.fetched_range.get(partition)
        )
        return PartitionEnds(position, stable, highwater, start)

    async def update(self) -> bool:
        """Refresh lag, records held by open transactions and readiness; True when every
        assigned partition is caught up: at its last stable offset, the end of what a
        read_committed consumer can read, with nothing fetched left uncommitted."""
        self._since_last_seek()
        ends: dict[int, PartitionEnds] = {}
        owned = sorted(set(self.checkpoints.positions) - set(self.readiness.halted))
        measured_all = bool(self.checkpoints.positions) and not self.checkpoints.opening
        for partition in owned:
            end = await self._ends(partition)
            if end is None:
                measured_all = False
                continue
            ends[partition] = end
            self.metrics.consumer_lag.labels(str(partition)).set(end.lag)
            self.reported.add(partition)
        self.metrics.set_uncommitted({p: end.uncommitted for p, end in ends.items()})
        self.readiness.held = held_partitions(self.readiness.held, ends, time.monotonic())
        lag = sum(end.lag for end in ends.values())
        # Partitions leaving the count (revoked, opening, stopped) are not records applied.
        self.readiness.set_lag(lag, complete=measured_all and not self.readiness.halted)
        if lag == 0 and measured_all:
            self.readiness.progressed()  # idle is not stalled
        return measured_all and lag == 0
