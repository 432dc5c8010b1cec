"""Small named fakes of the pipeline's edges, for pure tests of its logic (never in place of
Kafka or PostgreSQL in an integration test): one partition of the source topic, the
stored-offsets table with compare-and-set, the batch transaction as a function, and the
dead-letter producer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer.errors import FencedError
from consumer.kafka.dead_letters import DeadLetter
from consumer.ledger.batch import Applied, Decoded, Report
from consumer.ledger.claims import Outcome
from consumer.ledger.offsets import OffsetMove
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic

TOPIC = "chat.turn-events"
TP = TopicPartition(TOPIC, 0)


def planned_records(count: int) -> list[ConsumerRecord]:
    planned, _ = plan_traffic(TrafficConfig(threads=count // 10 + 1, seed=3, poison_rate=0))
    now = int(time.time() * 1000)
    return [
        ConsumerRecord(TOPIC, 0, offset, now, 0, key, value, None, len(key), len(value), ())
        for offset, (key, value) in enumerate(planned[:count])
    ]


class FakeLog:
    """One partition of the source topic, as much of AIOKafkaConsumer as the pipeline uses."""

    def __init__(self, records: list[ConsumerRecord]) -> None:
        self.records = records
        self.next = 0  # the fetch position
        self.paused: set[TopicPartition] = set()
        self.seeks: list[int] = []
        self.mirrored: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.next = offset
        self.seeks.append(offset)

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seek(tp, 0)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        await asyncio.sleep(0)
        if TP in self.paused or self.next >= len(self.records):
            return {}
        batch = self.records[self.next : self.next + max_records]
        self.next += len(batch)
        return {TP: batch}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.mirrored.append(offsets)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records)

    def last_stable_offset(self, tp: TopicPartition) -> int:
        return len(self.records)

    async def position(self, tp: TopicPartition) -> int:
        return self.next


class FakeOffsets:
    """consumer_offsets: what `load_offsets` reads (through a pool) and the batch transaction
    moves by compare-and-set; partition_halts: what `record_halts` and `clear_halts` write."""

    def __init__(self) -> None:
        self.stored: dict[int, int] = {}
        self.halts: dict[int, str] = {}

    async def execute(self, query: str, *args: Any) -> str:
        if query.lstrip().startswith("DELETE FROM partition_halts"):
            for partition in args[2]:
                self.halts.pop(partition, None)
        elif "INSERT INTO partition_halts" in query:
            self.halts.update(dict.fromkeys(args[2], args[3]))
        else:
            raise AssertionError(f"not faked: {query}")
        return ""

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeOffsets]:
        yield self

    async def fetch(self, query: str, *args: Any) -> list[dict[str, int]]:
        return [{"partition": p, "next_offset": o} for p, o in self.stored.items()]


class FakeLedger:
    """The batch transaction: moves offsets by compare-and-set, remembers what it applied."""

    def __init__(self, offsets: FakeOffsets) -> None:
        self.offsets = offsets
        self.applied: list[int] = []  # offsets of the records committed, in commit order
        self.fail_next: list[Exception] = []

    async def __call__(
        self, moves: Sequence[OffsetMove], decoded: Decoded, report: Report
    ) -> Applied:
        await asyncio.sleep(0)  # in flight: the loop fetches and decodes meanwhile
        await asyncio.sleep(0)
        if self.fail_next:
            raise self.fail_next.pop(0)
        for move in moves:
            if self.offsets.stored.get(move.partition) != move.expected:
                raise FencedError([move.partition])
        for move in moves:
            self.offsets.stored[move.partition] = move.next_offset
        self.applied.extend(record.offset for record in decoded.records)
        return Applied(events=[(event, Outcome.APPLIED) for event in decoded.events])


class FakeDlq:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def report(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)
