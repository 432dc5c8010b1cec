"""How far behind a partition is, as a read_committed consumer sees it.

The ledger reads committed records only (`isolation_level="read_committed"`): a record of a
transaction that was aborted, or is still open, is never applied. A partition can then be read
up to its last stable offset (LSO): the first offset of its oldest open transaction, or the
high watermark when none is open. Commit and abort markers take an offset each, and aborted
batches stay in the log; aiokafka's fetcher steps `position()` over both when `getmany()` drains
a fetch (`PartitionRecords._unpack_records` sets `next_fetch_offset` past control and aborted
batches, and `FetchResult.getall` moves the position there even when it returns no record). So
a partition whose last offset is a marker ends at `LSO - position == 0`, although the offset
stored in PostgreSQL (last applied record + 1) may point at that marker: lag is measured from
the position, never from the stored offset.

Per partition:
- lag (`token_ledger_consumer_lag_records`) = LSO - position: records readable now and not yet
  applied. Lag that does not shrink is a stall (/readyz: "stalled").
- uncommitted (`token_ledger_uncommitted_records`) = high watermark - LSO: records nobody can
  read until a transaction ends (its own, and every record written after its first one, by any
  producer). Ordinary while chat services publish in transactions; it means trouble only when
  the LSO stands still: a producer that died inside a transaction holds the partition until the
  broker aborts it at the producer's transaction timeout. /readyz reports that, as its own
  reason, once the LSO has stood still below records for LEDGER_STALL_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.status import Held, Readiness

if TYPE_CHECKING:
    from consumer.http.metrics import LedgerMetrics
    from consumer.kafka.checkpoint import Checkpoints


@dataclass(frozen=True)
class PartitionEnds:
    position: int  # the next offset the consumer will fetch
    stable: int  # last stable offset
    highwater: int

    @property
    def lag(self) -> int:
        return max(0, self.stable - self.position)

    @property
    def uncommitted(self) -> int:
        return max(0, self.highwater - self.stable)


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


async def update_lag(
    consumer: AIOKafkaConsumer,
    topic: str,
    checkpoints: Checkpoints,
    metrics: LedgerMetrics,
    readiness: Readiness,
    reported: set[int],
) -> bool:
    """Refresh lag, records held by open transactions and readiness; True when every
    assigned partition is caught up: at its last stable offset, the end of what a
    read_committed consumer can read. `reported`: partitions with a lag series (grows)."""
    positions = checkpoints.positions
    ends: dict[int, PartitionEnds] = {}
    caught_up = bool(positions) and not checkpoints.opening
    for partition in sorted(set(positions) - set(readiness.halted)):
        tp = TopicPartition(topic, partition)
        highwater, stable = consumer.highwater(tp), consumer.last_stable_offset(tp)
        # None until a fetch answered; -1 from a consumer that is not read_committed
        # (service.source_consumer always is): either way the end is unknown.
        if highwater is None or stable is None or stable < 0:
            caught_up = False
            continue
        end = PartitionEnds(await consumer.position(tp), stable, highwater)
        ends[partition] = end
        metrics.consumer_lag.labels(str(partition)).set(end.lag)
        reported.add(partition)
        caught_up = caught_up and end.lag == 0
    metrics.set_uncommitted({p: end.uncommitted for p, end in ends.items()})
    readiness.held = held_partitions(readiness.held, ends, time.monotonic())
    readiness.lag = sum(end.lag for end in ends.values())
    if readiness.lag == 0:
        readiness.progressed()  # idle is not stalled
    return caught_up
