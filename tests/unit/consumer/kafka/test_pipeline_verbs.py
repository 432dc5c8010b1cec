"""The pipeline's batch verbs in-process, with small fakes at the Kafka and database edges:
a partition log that fetches and seeks, a stored-offsets table with compare-and-set, and the
batch transaction as a function (tests/integration/ runs the same verbs on real services)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord

from consumer.errors import FencedError, TransientError
from consumer.http.metrics import LedgerMetrics
from consumer.kafka import checkpoint
from consumer.kafka.assembly import build_pipeline
from consumer.kafka.pipeline import Pipeline
from consumer.ledger.batch import Applied, Decoded, Report, apply_isolating
from consumer.ledger.claims import BatchPlan, Outcome
from consumer.ledger.decode import BatchDecoder
from consumer.ledger.offsets import OffsetMove
from consumer.retry import Backoff
from consumer.settings import load_settings
from consumer.status import Readiness
from producer.events import RejectReason
from producer.ledger_event import LedgerEvent
from tests.fakes import TOPIC, TP, FakeDlq, FakeLedger, FakeLog, FakeOffsets, planned_records


def _pipeline(
    log: FakeLog, ledger: FakeLedger, max_batch: int = 4, max_batch_bytes: int = 2**24
) -> Pipeline:
    settings = load_settings(
        kafka_bootstrap="127.0.0.1:9",
        database_url="postgresql+asyncpg://ledger:ledger@127.0.0.1:9/ledger",
        topic=TOPIC,
        max_batch=max_batch,
        max_batch_bytes=max_batch_bytes,
    )
    return build_pipeline(
        settings,
        log,
        ledger.offsets,
        FakeDlq(),  # type: ignore[arg-type]
        LedgerMetrics(),
        Readiness(600),
        backoff=Backoff(initial=0.001, maximum=0.001),
        commit=ledger,
    )


def _owning(log: FakeLog, offset: int) -> tuple[FakeLedger, Pipeline]:
    """A pipeline that owns partition 0 from `offset`, where the ledger stores it too."""
    ledger = FakeLedger(FakeOffsets())
    ledger.offsets.stored[0] = offset
    pipeline = _pipeline(log, ledger)
    pipeline.checkpoints.positions[0] = offset
    return ledger, pipeline


async def test_put_moves_offsets_from_the_expected_position_and_mirrors_them() -> None:
    records = planned_records(8)
    log = FakeLog(records)
    ledger, pipeline = _owning(log, 5)
    # A fetch issued before a seek hands back records already in the ledger: skipped.
    assert await pipeline.put(records)
    assert ledger.applied == [5, 6, 7]
    assert ledger.offsets.stored == {0: 8}
    assert pipeline.checkpoints.positions == {0: 8}
    await pipeline.checkpoints.mirrored()
    assert log.mirrored[-1] == {TP: 8}


class _SlowMirrorLog(FakeLog):
    """A group coordinator that answers an offset commit only when told to."""

    def __init__(self, records: list[ConsumerRecord]) -> None:
        super().__init__(records)
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.asked.set()
        await self.answer.wait()
        await super().commit(offsets)


async def test_a_batch_does_not_wait_for_the_offset_mirror_and_stop_does() -> None:
    records = planned_records(8)
    log = _SlowMirrorLog(records)
    ledger, pipeline = _owning(log, 0)
    assert await pipeline.put(records[:4])
    await log.asked.wait()  # the first batch's mirror is asked, and not answered
    assert await pipeline.put(records[4:])  # the next batch commits meanwhile
    assert ledger.offsets.stored == {0: 8}
    assert log.mirrored == []
    stopping = asyncio.create_task(pipeline.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # stop waits for the mirror
    log.answer.set()
    await stopping
    # The positions that moved while the first commit was out go with the next one.
    assert log.mirrored == [{TP: 4}, {TP: 8}]


class _HungCoordinatorLog(FakeLog):
    """A group coordinator that never answers an offset commit."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await asyncio.Event().wait()


@pytest.mark.parametrize("verb", ["close", "stop"])
async def test_a_hung_coordinator_holds_a_revoke_or_a_stop_one_mirror_bound_at_most(
    verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches queue two mirrors (the second waits for the first); a revoke or a stop
    waits for them one MIRROR_SECONDS in all, not one each, and leaves none running."""
    bound = 0.5
    monkeypatch.setattr(checkpoint, "MIRROR_SECONDS", bound)
    records = planned_records(8)
    _, pipeline = _owning(_HungCoordinatorLog(records), 0)
    assert await pipeline.put(records[:4])
    assert await pipeline.put(records[4:])
    started = time.monotonic()
    await (pipeline.close([TP]) if verb == "close" else pipeline.stop())
    # Two bounds (1.0 s) without the overall one; the margin is for a loaded machine.
    assert time.monotonic() - started < bound * 1.5
    assert pipeline.checkpoints._mirroring is not None
    assert pipeline.checkpoints._mirroring.done()


async def test_a_fenced_batch_rolls_back_and_seeks_to_the_stored_offset() -> None:
    records = planned_records(6)
    log, ledger = FakeLog(records), FakeLedger(FakeOffsets())
    ledger.offsets.stored[0] = 4  # another owner got here first
    pipeline = _pipeline(log, ledger)
    pipeline.checkpoints.positions[0] = 2
    assert not await pipeline.put(records[2:])
    assert ledger.applied == []
    assert pipeline.checkpoints.positions == {0: 4}
    assert log.seeks[-1] == 4
    assert pipeline.metrics.registry.get_sample_value("token_ledger_fenced_batches_total") == 1


async def test_a_batch_retrying_while_its_partitions_are_revoked_is_abandoned() -> None:
    records = planned_records(4)
    log, ledger = FakeLog(records), FakeLedger(FakeOffsets())
    pipeline = _pipeline(log, ledger)
    pipeline.checkpoints.positions[0] = None  # nothing stored yet
    ledger.fail_next = [TransientError("database away")] * 3
    pipeline.revoking = True
    assert not await pipeline.put(records)
    assert ledger.applied == []
    assert ledger.offsets.stored == {}
    assert log.seeks[-1] == 0  # fetched again from the beginning: nothing was committed
    assert TP not in log.paused  # fetching resumed after the retries


async def test_a_record_the_database_rejects_is_isolated_and_dead_lettered() -> None:
    records = planned_records(7)
    pipeline = _pipeline(FakeLog(records), FakeLedger(FakeOffsets()))
    decoded = (await pipeline._decode(records)).decoded
    poison = decoded.events[4]

    async def apply(conn: Any, events: Sequence[LedgerEvent], rows: Any) -> BatchPlan:
        if any(event is poison for event in events):  # identity: exact copies are equal
            raise asyncpg.CheckViolationError("violates check constraint")
        return BatchPlan([], [], [], [Outcome.APPLIED] * len(events), [])

    class Savepoints:
        def transaction(self) -> Any:
            return _nothing()

    applied = Applied()
    items = list(zip(decoded.events, decoded.records, strict=True))
    await apply_isolating(Savepoints(), items, applied, apply)
    assert [letter.record.offset for letter in applied.letters] == [decoded.records[4].offset]
    assert applied.letters[0].reason is RejectReason.DATABASE_REJECTED
    assert [outcome for _, outcome in applied.events] == [
        Outcome.REJECTED if event is poison else Outcome.APPLIED for event in decoded.events
    ]


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


async def test_the_batch_fetched_during_a_fenced_commit_is_discarded_never_skipped() -> None:
    records = planned_records(30)
    log, ledger = FakeLog(records), FakeLedger(FakeOffsets())
    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger)
    await pipeline.open([TP])
    ledger.fail_next = [FencedError([0]), TransientError("blip")]
    await pipeline.run(until_idle=True)
    # Every record applied exactly once, in offset order: the batch decoded while the first
    # commit was in flight was fetched again from where the ledger stood.
    assert ledger.applied == list(range(30))
    assert ledger.offsets.stored == {0: 30}


async def test_a_stop_requested_while_a_batch_commits_starts_no_other() -> None:
    records = planned_records(30)
    log, ledger = FakeLog(records), FakeLedger(FakeOffsets())
    commit = ledger.__call__

    async def stop_meanwhile(
        moves: Sequence[OffsetMove], decoded: Decoded, report: Report
    ) -> Applied:
        pipeline.request_stop()  # SIGTERM while the first batch is in flight
        return await commit(moves, decoded, report)

    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger)
    pipeline.commit = stop_meanwhile
    await pipeline.open([TP])
    await pipeline.run()
    # The next batch was fetched and decoded while the first committed: it is not started.
    assert ledger.applied == [0, 1, 2, 3]
    assert ledger.offsets.stored == {0: 4}


class _ArrivingLog(FakeLog):
    """A partition that tells when getmany has handed out a given offset."""

    def __init__(self, records: list[ConsumerRecord]) -> None:
        super().__init__(records)
        self.handed: dict[int, asyncio.Event] = {}

    def handed_out(self, offset: int) -> asyncio.Event:
        return self.handed.setdefault(offset, asyncio.Event())

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        fetched = await super().getmany(timeout_ms=timeout_ms, max_records=max_records)
        for record in fetched.get(TP, []):
            self.handed_out(record.offset).set()
        return fetched


def _arrivals_during_the_first_commit(
    log: _ArrivingLog, ledger: FakeLedger, arriving: list[ConsumerRecord], taken: int
) -> tuple[list[list[int]], Any]:
    """A commit that records each batch's offsets; the first holds until the next batch was
    fetched (offset 4), then `arriving` reach the log, then it waits (5 s at most) until
    offset `taken` was handed out. Without gathering nothing takes them meanwhile, and the
    callers' assertions fail."""
    commits: list[list[int]] = []
    commit = ledger.__call__

    async def first_waits_for_arrivals(
        moves: Sequence[OffsetMove], decoded: Decoded, report: Report
    ) -> Applied:
        if not commits:
            await log.handed_out(4).wait()
            log.records.extend(arriving)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(log.handed_out(taken).wait(), 5)
        commits.append([record.offset for record in decoded.records])
        return await commit(moves, decoded, report)

    return commits, first_waits_for_arrivals


async def test_records_arriving_while_a_batch_commits_join_the_next_batch() -> None:
    """Fetched after the next batch was: taken into it while the batch in flight commits, so
    they wait for that batch and their own, not one more."""
    records = planned_records(7)
    log, ledger = _ArrivingLog(records[:5]), FakeLedger(FakeOffsets())
    commits, pipeline_commit = _arrivals_during_the_first_commit(log, ledger, records[5:], 6)
    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger, max_batch=4)
    pipeline.commit = pipeline_commit
    await pipeline.open([TP])
    await pipeline.run(until_idle=True)
    assert commits == [[0, 1, 2, 3], [4, 5, 6]]
    assert ledger.offsets.stored == {0: 7}


async def test_a_batch_gathers_no_more_than_max_batch_records_nor_max_batch_bytes() -> None:
    records = planned_records(30)
    log, ledger = _ArrivingLog(records[:5]), FakeLedger(FakeOffsets())
    commits, pipeline_commit = _arrivals_during_the_first_commit(log, ledger, records[5:], 7)
    cap = sum(len(r.value) for r in records[:6]) - 1  # less than six records' worth
    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger, max_batch=4, max_batch_bytes=cap)
    pipeline.commit = pipeline_commit
    await pipeline.open([TP])
    await pipeline.run(until_idle=True)
    assert ledger.applied == list(range(30))  # every record once, in offset order
    assert all(len(offsets) <= 4 for offsets in commits)
    assert all(sum(len(records[o].value) for o in offsets) <= cap for offsets in commits)
    assert commits[1] == [4, 5, 6, 7]  # gathered up to max_batch


class _TruncatedLog(_ArrivingLog):
    """Truncated (an unclean leader election) to `end`: a fetch from past it is out of range."""

    def __init__(self, records: list[ConsumerRecord]) -> None:
        super().__init__(records)
        self.end: int | None = None
        self.refused = asyncio.Event()

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        if self.end is not None and self.next > self.end:
            self.refused.set()
            raise OffsetOutOfRangeError({TP: self.next})
        return await super().getmany(timeout_ms=timeout_ms, max_records=max_records)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, len(self.records))


async def test_a_take_out_of_range_past_the_stored_offset_judges_the_stored_offset() -> None:
    """The log ends, after a truncation, below the position a take fetches from but above the
    stored offset: the batch being gathered is fetched again from the stored offset, which is
    inside the log, so nothing halts and nothing is reset."""
    records = planned_records(8)
    log, ledger = _TruncatedLog(records[:4]), FakeLedger(FakeOffsets())
    first = True
    commit = ledger.__call__

    async def truncated_meanwhile(
        moves: Sequence[OffsetMove], decoded: Decoded, report: Report
    ) -> Applied:
        nonlocal first
        if first:
            first = False
            log.records.extend(records[4:])  # the next batch arrives and is fetched: 4..7
            await log.handed_out(7).wait()
            del log.records[6:]  # then the log is cut at 6
            log.end = 6
            with contextlib.suppress(TimeoutError):  # not taken: nothing is tested
                await asyncio.wait_for(log.refused.wait(), 5)
        return await commit(moves, decoded, report)

    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger, max_batch=10)
    pipeline.commit = truncated_meanwhile
    await pipeline.open([TP])
    await pipeline.run(until_idle=True)
    assert log.refused.is_set()  # a take met the end of the log
    assert pipeline.readiness.halted == {}
    resets = pipeline.metrics.registry.get_sample_value(
        "token_ledger_offset_resets_total", {"partition": "0"}
    )
    assert not resets
    assert ledger.applied == [0, 1, 2, 3, 4, 5]


async def test_a_batch_holds_at_most_max_batch_bytes_of_values_and_skips_nothing() -> None:
    records = planned_records(40)
    cap = sum(len(r.value) for r in records[:3])  # three records' worth, at most
    records[7] = dataclasses.replace(records[7], value=records[7].value + b" " * (2 * cap))
    log, ledger = FakeLog(records), FakeLedger(FakeOffsets())
    commits: list[list[int]] = []
    commit = ledger.__call__

    async def sized(moves: Sequence[OffsetMove], decoded: Decoded, report: Report) -> Applied:
        commits.append([record.offset for record in decoded.records])
        return await commit(moves, decoded, report)

    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger, max_batch=10, max_batch_bytes=cap)
    pipeline.commit = sized
    await pipeline.open([TP])
    await pipeline.run(until_idle=True)
    assert ledger.applied == list(range(40))  # every record once, in offset order
    assert [7] in commits  # a record over the cap is a batch of its own
    for offsets in commits:
        assert len(offsets) == 1 or sum(len(records[o].value) for o in offsets) <= cap
    assert max(map(len, commits)) == 3  # the cap, not max_batch, bounded the batches


async def test_unknown_fields_are_counted_per_record_by_event_type() -> None:
    records = planned_records(60)
    # Redelivered (a producer's retry, further on in the log): each record counts.
    records += [dataclasses.replace(r, offset=r.offset + 50) for r in records[10:20]]
    log, ledger = FakeLog(records), FakeLedger(FakeOffsets())
    ledger.offsets.stored[0] = 0
    pipeline = _pipeline(log, ledger, max_batch=25)
    await pipeline.open([TP])
    await pipeline.run(until_idle=True)
    want: dict[str, int] = {}
    for record in records:
        decode = BatchDecoder(max_bytes=2**20, max_future_skew=None)
        decode(record.value, record.timestamp)
        for kind, count in decode.unknown_fields.items():
            want[kind] = want.get(kind, 0) + count
    assert want  # the simulator sends fields this consumer does not know
    registry = pipeline.metrics.registry
    for kind, count in want.items():
        got = registry.get_sample_value("token_ledger_unknown_fields_total", {"type": kind})
        assert got == count, kind


async def test_cancelling_the_loop_cancels_the_batch_in_flight() -> None:
    """A stop whose batch hangs on the database cancels the loop (service.STOP_GRACE_SECONDS):
    the batch, in its own task, must not outlive it."""

    class QuietLog(FakeLog):  # like aiokafka: a fetch with nothing to read waits
        async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
            if self.next >= len(self.records):
                await asyncio.Event().wait()
            return await super().getmany(timeout_ms=timeout_ms, max_records=max_records)

    log, ledger = QuietLog(planned_records(4)), FakeLedger(FakeOffsets())
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hung(moves: Sequence[OffsetMove], decoded: Decoded, report: Report) -> Applied:
        started.set()
        try:
            await asyncio.Event().wait()  # a database that never answers
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    pipeline = _pipeline(log, ledger)
    pipeline.commit = hung
    await pipeline.open([TP])
    running = asyncio.create_task(pipeline.run())
    await started.wait()
    await asyncio.sleep(0)  # the loop goes back to fetching while the batch is in flight
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await cancelled.wait()
    assert ledger.offsets.stored == {}


class PartitionedLog(FakeLog):
    """Several partitions, fetched like aiokafka: per partition up to `fetch_bytes` of records
    buffered, handed out by getmany up to max_records (buffers in `order`)."""

    def __init__(
        self, logs: dict[int, list[ConsumerRecord]], fetch_bytes: int, rng: random.Random | None
    ) -> None:
        super().__init__([])
        self.logs = logs
        self.fetch_bytes = fetch_bytes
        self.rng = rng
        self.positions = dict.fromkeys(logs, 0)
        self.buffers: dict[int, list[ConsumerRecord]] = {}
        self.fetches = 0

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.logs}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp.partition] = offset
        self.buffers.pop(tp.partition, None)
        self.seeks.append(offset)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        await asyncio.sleep(0)
        paused = {tp.partition for tp in self.paused}
        for p, log in self.logs.items():
            if p in paused or p in self.buffers:
                continue
            buffered: list[ConsumerRecord] = []
            size = 0
            while self.positions[p] < len(log) and (
                not buffered or size + len(log[self.positions[p]].value) <= self.fetch_bytes
            ):
                buffered.append(log[self.positions[p]])
                size += len(buffered[-1].value)
                self.positions[p] += 1
            if buffered:
                self.buffers[p] = buffered
        order = list(self.buffers)
        if self.rng is not None:
            self.rng.shuffle(order)
        handed: dict[Any, Any] = {}
        for p in order:
            if p in paused or max_records == 0:
                continue
            take, self.buffers[p] = self.buffers[p][:max_records], self.buffers[p][max_records:]
            if not self.buffers[p]:
                del self.buffers[p]
            handed[TopicPartition(TOPIC, p)] = take
            max_records -= len(take)
        self.fetches += bool(handed)
        return handed

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.partition])

    def last_stable_offset(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.partition])

    async def position(self, tp: TopicPartition) -> int:
        buffered = self.buffers.get(tp.partition)
        return buffered[0].offset if buffered else self.positions[tp.partition]


class FlakyLedger(FakeLedger):
    """Commits by compare-and-set like FakeLedger; with `rng`, now and then fenced or failing."""

    def __init__(self, offsets: FakeOffsets, rng: random.Random | None) -> None:
        super().__init__(offsets)
        self.rng = rng
        self.per_partition: dict[int, list[int]] = {}
        self.batches: list[set[int]] = []  # the partitions of each committed batch

    async def __call__(
        self, moves: Sequence[OffsetMove], decoded: Decoded, report: Report
    ) -> Applied:
        if self.rng is not None:
            for _ in range(self.rng.randint(0, 3)):
                await asyncio.sleep(0)
            draw = self.rng.random()
            if draw < 0.08:
                raise FencedError([move.partition for move in moves])
            if draw < 0.12:
                raise TransientError("blip")
        applied = await super().__call__(moves, decoded, report)
        for record in decoded.records:
            self.per_partition.setdefault(record.partition, []).append(record.offset)
        self.batches.append({record.partition for record in decoded.records})
        return applied


def _partitioned(count: int, size: int, rng: random.Random) -> dict[int, list[ConsumerRecord]]:
    values = [record.value for record in planned_records(60)]
    now = int(time.time() * 1000)
    logs: dict[int, list[ConsumerRecord]] = {}
    for p in range(count):
        logs[p] = []
        for offset in range(rng.randint(0, size)):
            value = rng.choice(values) + b" " * rng.choice([0, 0, 0, 3000])
            logs[p].append(
                ConsumerRecord(TOPIC, p, offset, now, 0, b"k", value, None, 1, len(value), ())
            )
    return logs


def _partitioned_pipeline(
    log: PartitionedLog, ledger: FlakyLedger, max_batch: int, max_batch_bytes: int
) -> Pipeline:
    pipeline = _pipeline(log, ledger, max_batch=max_batch, max_batch_bytes=max_batch_bytes)
    ledger.offsets.stored = dict.fromkeys(log.logs, 0)
    return pipeline


async def test_a_byte_capped_fetch_is_applied_whole_before_the_next_one() -> None:
    """Eight partitions of 10 KB records, a cap of three records: the rest of a fetch is the
    next batch, not fetched again, so every partition moves from the first fetch on (cut
    batches rewound instead would start from the lowest partitions every time)."""
    value = planned_records(1)[0].value.ljust(10_000)
    now = int(time.time() * 1000)
    logs = {
        p: [
            ConsumerRecord(TOPIC, p, o, now, 0, b"k", value, None, 1, len(value), ())
            for o in range(40)
        ]
        for p in range(8)
    }
    log, ledger = PartitionedLog(logs, 100_000, None), FlakyLedger(FakeOffsets(), None)
    pipeline = _partitioned_pipeline(log, ledger, max_batch=2_000, max_batch_bytes=30_000)
    await pipeline.open([TopicPartition(TOPIC, p) for p in logs])
    await pipeline.run(until_idle=True)
    assert all(ledger.per_partition[p] == list(range(40)) for p in logs)
    first_fetch = 10 * len(logs)  # 100 KB per partition: 10 records each
    first: set[int] = set().union(*ledger.batches[: first_fetch // 3 + 1])
    assert first == set(logs)  # every partition within the first fetch's batches
    assert len(log.seeks) == len(logs)  # the opening seeks only: nothing fetched twice


@pytest.mark.parametrize("seed", range(60))
async def test_byte_capped_batches_apply_every_record_once_in_order(seed: int) -> None:
    """Random partitions, record sizes, caps, fences, failures, rebalances and gathering."""
    rng = random.Random(seed)
    logs = _partitioned(rng.randint(1, 5), 60, rng)
    log = PartitionedLog(logs, rng.choice([2_000, 5_000, 10**6]), rng)
    ledger = FlakyLedger(FakeOffsets(), rng)
    pipeline = _partitioned_pipeline(
        log,
        ledger,
        max_batch=rng.choice([1, 3, 10, 50]),
        max_batch_bytes=rng.choice([1, 1_500, 4_000, 20_000, 2**24]),
    )
    # Gathering into the next batch on every turn of the loop while a batch commits.
    pipeline.gather_seconds = rng.choice([0, pipeline.gather_seconds])
    tps = [TopicPartition(TOPIC, p) for p in logs]
    await pipeline.open(tps)

    async def rebalances() -> None:
        for _ in range(rng.randint(0, 4)):
            for _ in range(rng.randint(0, 30)):
                await asyncio.sleep(0)
            moved = [tp for tp in tps if rng.random() < 0.5]
            await pipeline.close(moved)
            for _ in range(rng.randint(0, 5)):
                await asyncio.sleep(0)
            await pipeline.open(moved)

    rebalancing = asyncio.create_task(rebalances())
    await asyncio.wait_for(pipeline.run(until_idle=True), 60)
    await rebalancing
    await asyncio.wait_for(pipeline.run(until_idle=True), 60)  # reopened after it went idle
    for p, records in logs.items():
        assert ledger.per_partition.get(p, []) == list(range(len(records)))
        assert ledger.offsets.stored[p] == len(records)


async def test_a_carried_batch_does_not_count_as_the_broker_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker goes away after a fetch that the byte cap cut into ten batches: those batches
    come from memory, so the outage is logged once, not ended and begun again per batch."""
    value = planned_records(1)[0].value.ljust(10_000)
    now = int(time.time() * 1000)
    logs = {
        0: [
            ConsumerRecord(TOPIC, 0, o, now, 0, b"k", value, None, 1, len(value), ())
            for o in range(10)
        ]
    }
    log, ledger = PartitionedLog(logs, 10**6, None), FlakyLedger(FakeOffsets(), None)
    pipeline = _partitioned_pipeline(log, ledger, max_batch=2_000, max_batch_bytes=10_000)

    async def topics() -> set[str]:
        return {TOPIC}

    log.topics = topics  # type: ignore[attr-defined]  # the idle probe's question
    commit = ledger.__call__

    async def broker_gone(moves: Sequence[OffsetMove], decoded: Decoded, report: Report) -> Applied:
        pipeline.kafka.failing("Unable to update metadata")  # what aiokafka's logs report
        return await commit(moves, decoded, report)

    pipeline.commit = broker_gone
    await pipeline.open([TopicPartition(TOPIC, 0)])
    with caplog.at_level(logging.INFO, logger="consumer"):
        await pipeline.run(until_idle=True)
    assert log.fetches == 1 and ledger.per_partition[0] == list(range(10))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Kafka")]
    assert said.count("Kafka reachable again") <= 1, said
