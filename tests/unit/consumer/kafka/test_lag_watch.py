"""Lag as the readiness watch refreshes it beside the pipeline: a blocked first batch, a
rebalance or a halt in a long backlog, a seek below what was fetched, a revocation while the
watch waits (fakes of the consumer's few calls: this is the pure bookkeeping)."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord

from consumer.http.metrics import LedgerMetrics
from consumer.kafka.lag import Lag
from consumer.status import Readiness

TOPIC = "chat.turn-events"


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


def record(partition: int, offset: int) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, b"1", b"{}", None, 1, 2, [])


class Consumer:
    """As much of AIOKafkaConsumer as Lag uses; highwater/last_stable_offset assert like
    aiokafka's when the partition is not assigned."""

    def __init__(self, ends: dict[int, tuple[int, int, int]]) -> None:
        self.ends = ends  # partition -> (position, stable, highwater)
        self.assigned = {tp(p) for p in ends}
        self.gates: dict[int, asyncio.Event] = {}  # position() waits (an invalid position)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, t: TopicPartition) -> int:
        assert t in self.assigned, "Partition is not assigned"
        return self.ends[t.partition][2]

    def last_stable_offset(self, t: TopicPartition) -> int:
        assert t in self.assigned, "Partition is not assigned"
        return self.ends[t.partition][1]

    async def position(self, t: TopicPartition) -> int:
        if gate := self.gates.get(t.partition):
            await gate.wait()
        if t not in self.assigned:
            raise IllegalStateError(f"Partition {t} is not assigned")
        return self.ends[t.partition][0]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def lag_of(consumer: Consumer, positions: dict[int, int | None]) -> tuple[Lag, Readiness]:
    readiness = Readiness(stall_seconds=5, assigned=frozenset(positions))
    checkpoints: Any = SimpleNamespace(positions=positions, opening=set(), generation=0)
    return Lag(consumer, TOPIC, checkpoints, LedgerMetrics(), readiness), readiness


async def test_a_first_batch_blocked_on_the_database_counts_as_lag_and_stalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new group (or a partition never committed): no stored row, positions[0] is None.
    # 60 records fetched (the position is past them) and the batch is blocked on a lock.
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    consumer = Consumer({0: (60, 60, 60)})
    lag, readiness = lag_of(consumer, {0: None})
    readiness.last_progress = clock.now
    lag.fetched([record(0, o) for o in range(60)], 0)
    for _ in range(10):  # the watch, every second
        clock.now += 1
        caught_up = await lag.update()
        readiness.judge()
    assert (readiness.lag, caught_up) == (60, False)
    assert readiness.reasons_not_ready()[0].startswith("stalled")


async def test_a_rebalance_in_a_long_backlog_is_not_caught_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="consumer.status")
    consumer = Consumer({0: (500, 10_000, 10_000)})
    positions: dict[int, int | None] = {0: 400}
    lag, readiness = lag_of(consumer, positions)
    readiness.last_progress = clock.now
    lag.fetched([record(0, o) for o in range(400, 500)], 0)
    for _ in range(15):  # a backlog of 9,600 records for 15 s, nothing committed (a stall)
        clock.now += 1
        await lag.update()
        readiness.judge()
    assert readiness.lag == 9_600
    caplog.clear()
    # The group rebalances: Pipeline.close forgets the partition (checkpoints.close + forget),
    # then aiokafka assigns it again (paused, `opening`, until open_pending seeks it).
    positions.pop(0)
    lag.forget([0])
    clock.now += 1
    await lag.update()
    readiness.judge()
    said = [r.getMessage() for r in caplog.records]
    # Nothing was committed: the stall ends as the partition left, and nothing was applied.
    assert said == ["stall over: the partitions that waited were revoked or stopped"]


async def test_a_partition_halted_in_a_long_stall_is_not_caught_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="consumer.status")
    consumer = Consumer({0: (500, 600, 600)})
    lag, readiness = lag_of(consumer, {0: 400})
    readiness.last_progress = clock.now
    lag.fetched([record(0, o) for o in range(400, 500)], 0)
    for _ in range(15):
        clock.now += 1
        await lag.update()
        readiness.judge()
    caplog.clear()
    # The dead-letter topic refuses a record for good: Checkpoints.halt stops the partition.
    readiness.halted[0] = "dead letter refused: too large"
    clock.now += 1
    await lag.update()
    readiness.judge()
    # Those records will not be applied until a restart: no "caught up" for them.
    assert [r.getMessage() for r in caplog.records] == [
        "stall over: the partitions that waited were revoked or stopped"
    ]


async def test_lag_is_not_stuck_after_the_partition_was_sought_below_what_was_fetched() -> None:
    # Topic recreated (or an unclean election truncated it): the stored offset 1000 is above
    # the log's end, LEDGER_OFFSET_RESET=earliest resets it to 0 and the consumer re-applies
    # the new log: records 0..988 and a transaction's commit marker at 989 (LSO = HW = 990).
    consumer = Consumer({0: (990, 990, 990)})
    positions: dict[int, int | None] = {0: 1000}
    lag, readiness = lag_of(consumer, positions)
    lag.fetched([record(0, o) for o in range(900, 1000)], 0)  # the old log, committed
    positions[0] = 0  # Checkpoints.out_of_range: reset and seek to the log start
    lag.checkpoints.generation += 1  # every seek bumps it
    lag.fetched([record(0, o) for o in range(0, 989)], 1)  # the new log
    positions[0] = 989  # committed: everything there is is in the ledger
    caught_up = await lag.update()
    assert (readiness.lag, caught_up) == (0, True)


async def test_the_watch_racing_a_revocation_leaves_no_lag_series_and_does_not_raise() -> None:
    # Partition 0's position is being reset (seek_to_beginning after a rewind of a partition
    # with no stored row): aiokafka's position() waits. Meanwhile the group rebalances.
    consumer = Consumer({0: (5, 10, 10), 1: (7, 20, 20)})
    positions: dict[int, int | None] = {0: 0, 1: 3}
    lag, _ = lag_of(consumer, positions)
    consumer.gates[0] = asyncio.Event()
    watch = asyncio.create_task(lag.update())
    await asyncio.sleep(0)
    # Pipeline.close (revocation) and aiokafka's new assignment (neither partition ours).
    positions.clear()
    lag.forget([0, 1])
    consumer.assigned = set()
    consumer.gates[0].set()
    # aiokafka's position() raises IllegalStateError once the assignment changed: skipped,
    # and the revoked partition's series is not re-created.
    await watch
    assert (
        lag.metrics.registry.get_sample_value(
            "token_ledger_consumer_lag_records", {"partition": "0"}
        )
        is None
    )
