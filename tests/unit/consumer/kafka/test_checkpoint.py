"""Checkpoints: the offset mirror never holds the ledger up; a stopped partition is recorded
for `token-ledger status`, and a new owner judges it afresh."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from aiokafka import TopicPartition

from consumer.http.metrics import LedgerMetrics
from consumer.kafka import checkpoint as checkpoint_module
from consumer.kafka.checkpoint import Checkpoints
from consumer.settings import load_settings
from consumer.status import Readiness
from tests.fakes import TOPIC, FakeOffsets


class _CoordinatorGone:
    """The Kafka edge of the offset mirror when the group coordinator never answers."""

    async def commit(self, offsets: object) -> None:
        await asyncio.Event().wait()


async def test_the_offset_mirror_gives_up_instead_of_holding_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mirror is for lag tooling only: a commit that hangs must not hold the batch lock
    (every partition) or a shutdown with it."""
    monkeypatch.setattr(checkpoint_module, "MIRROR_SECONDS", 0.05)
    settings = load_settings(database_url="postgresql+asyncpg://ledger@127.0.0.1/ledger")
    checkpoints = Checkpoints(
        settings,
        cast(Any, _CoordinatorGone()),
        cast(Any, None),
        LedgerMetrics(),
        Readiness(stall_seconds=60),
        cast(Any, None),
    )
    checkpoints.positions = {0: 10}
    async with asyncio.timeout(10):  # a hang guard: the mirror itself gives up after 0.05 s
        await checkpoints.mirror()
    assert checkpoints._mirror.down


class _Partitions:
    """The Kafka edge of halting and opening: pause, seek, resume, the offset mirror."""

    def __init__(self, assigned: set[int]) -> None:
        self.assigned = {TopicPartition(TOPIC, p) for p in assigned}
        self.paused: set[TopicPartition] = set()
        self.mirrored: list[dict[int, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            raise ValueError(offsets)  # as aiokafka's commit_structure_validate does
        self.mirrored.append({tp.partition: offset for tp, offset in offsets.items()})

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        pass


class _DatabaseAway:
    def acquire(self) -> Any:
        raise OSError("connection refused")


async def _once(operation: Any) -> Any:
    return await operation()


def _checkpoints(consumer: _Partitions, pool: object) -> Checkpoints:
    settings = load_settings(
        database_url="postgresql+asyncpg://ledger@127.0.0.1/ledger", topic=TOPIC
    )
    return Checkpoints(
        settings,
        cast(Any, consumer),
        cast(Any, pool),
        LedgerMetrics(),
        Readiness(stall_seconds=60),
        cast(Any, _once),
    )


async def test_a_halt_is_recorded_and_a_new_owner_clears_the_partitions_it_runs() -> None:
    offsets = FakeOffsets()
    offsets.halts = {2: "offset out of range: an earlier owner's"}
    consumer = _Partitions({0, 1, 2})
    checkpoints = _checkpoints(consumer, offsets)
    checkpoints.positions = {0: 5, 1: 7}

    await checkpoints.halt([1], "dead letter refused: too large")
    assert offsets.halts == {
        1: "dead letter refused: too large",
        2: "offset out of range: an earlier owner's",
    }
    assert checkpoints.readiness.halted == {1: "dead letter refused: too large"}

    # Assigned again: partition 2 is judged afresh; 1 is still stopped in this process.
    checkpoints.open([TopicPartition(TOPIC, p) for p in (1, 2)])
    await checkpoints.open_pending()
    assert offsets.halts == {1: "dead letter refused: too large"}
    assert TopicPartition(TOPIC, 1) in consumer.paused
    assert TopicPartition(TOPIC, 2) not in consumer.paused
    # Kafka's group view shows where the ledger stands as soon as the partitions are opened.
    assert consumer.mirrored[-1].keys() == set(checkpoints.positions) - {
        p for p, o in checkpoints.positions.items() if o is None
    }


async def test_opening_partitions_with_nothing_stored_mirrors_nothing() -> None:
    consumer = _Partitions({0, 1})
    checkpoints = _checkpoints(consumer, FakeOffsets())
    checkpoints.open([TopicPartition(TOPIC, p) for p in (0, 1)])
    await checkpoints.open_pending()
    assert checkpoints.positions == {0: None, 1: None}
    assert consumer.mirrored == []


async def test_a_halt_the_database_cannot_record_is_said_and_still_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoints = _checkpoints(_Partitions({0}), _DatabaseAway())
    checkpoints.positions = {0: 5}
    with caplog.at_level(logging.WARNING, logger=checkpoint_module.__name__):
        await checkpoints.halt([0], "offset out of range: stored offset 5 is outside the log")
    assert checkpoints.readiness.halted == {
        0: "offset out of range: stored offset 5 is outside the log"
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "could not record the stopped partitions: `token-ledger status` will not show them"
        " (/readyz does)"
    ]
    assert "OSError: connection refused" in str(warnings[0].__dict__)
