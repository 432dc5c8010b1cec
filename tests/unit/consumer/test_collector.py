"""The garbage collector as `consume` runs it (consumer/collector.py): counted collections that
a drain never reaches, and a sweep that frees cycles within seconds all the same."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator, Iterator

import pytest

from consumer import collector
from consumer.ledger.claims import StoredState, event_rows
from consumer.ledger.decode import BatchDecoder
from consumer.ledger.merge import reduce_batch
from consumer.settings import Settings
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer.events import DEFAULT_MAX_EVENT_BYTES, Rejection


class Node:
    """Something that can be in a reference cycle and be watched being freed."""

    def __init__(self) -> None:
        self.itself = self


@pytest.fixture
def counted_collections_far_off() -> Iterator[None]:
    """As in a consumer between two counted collections: none runs by itself in the test."""
    before = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**9, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def a_cycle_watched() -> asyncio.Event:
    """A cycle, already garbage: the event is set when the collector frees it."""
    freed = asyncio.Event()
    weakref.finalize(Node(), freed.set)
    return freed


def a_cycle_held() -> tuple[list[Node], asyncio.Event]:
    """A cycle alive while the list holds it; the event is set when the collector frees it."""
    node, freed = Node(), asyncio.Event()
    weakref.finalize(node, freed.set)
    return [node], freed


@contextlib.asynccontextmanager
async def sweeping(*, full_every: int = collector.FULL_SWEEP_EVERY) -> AsyncIterator[Sweeps]:
    sweeps = Sweeps()
    gc.callbacks.append(sweeps.seen)
    task = asyncio.create_task(collector.sweep(every=0.001, full_every=full_every))
    try:
        yield sweeps
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gc.callbacks.remove(sweeps.seen)


class Sweeps:
    """The collections the sweep runs, as they end (the test holds the counted ones off)."""

    def __init__(self) -> None:
        self.generations: list[int] = []  # each collection's, once it ended
        self.running: int | None = None  # the generation of the one under way
        self._ended = asyncio.Event()

    def seen(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.running = info["generation"]
        else:
            self.generations.append(info["generation"])
            self._ended.set()

    async def next(self) -> int:
        self._ended.clear()
        await asyncio.wait_for(self._ended.wait(), timeout=10)
        return self.generations[-1]


@pytest.mark.usefixtures("counted_collections_far_off")
async def test_the_sweep_frees_a_cycle_that_no_count_would_reach() -> None:
    freed = a_cycle_watched()
    async with sweeping():
        await asyncio.wait_for(freed.wait(), timeout=10)


@pytest.mark.usefixtures("counted_collections_far_off")
async def test_a_cycle_that_outlived_a_sweep_is_freed_by_the_next_full_one() -> None:
    # Alive at a sweep (a batch being retried, a pool's connection attempt), garbage after: it
    # has left the young generation, and an explicit collection of the young never starts an
    # older one's, whatever their counts.
    held, freed = a_cycle_held()
    async with sweeping(full_every=3) as sweeps:
        assert await sweeps.next() == 0
        freed_by = []  # the generation collected when it was freed: a full sweep's
        weakref.finalize(held[0], lambda: freed_by.append(sweeps.running))
        held.clear()
        await asyncio.wait_for(freed.wait(), timeout=10)
        assert freed_by == [2], sweeps.generations


@pytest.mark.usefixtures("counted_collections_far_off")
async def test_without_the_sweep_the_cycle_stays() -> None:
    # The other half of the claim: at these counts nothing else would free it.
    freed = a_cycle_watched()
    for _ in range(100):
        await asyncio.sleep(0)
    assert not freed.is_set()
    gc.collect(0)
    assert freed.is_set()


@pytest.mark.usefixtures("counted_collections_far_off")
def test_a_batch_in_flight_and_the_next_stay_under_the_count() -> None:
    """What the threshold is chosen against: at the default LEDGER_MAX_BATCH, the batch that
    commits and the next one being decoded, together, never start a counted collection."""
    records = [value for _, value in plan_traffic(TrafficConfig(threads=200, seed=3))[0]]
    values = records[: Settings.model_fields["max_batch"].default]
    gc.collect()
    decode = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=None)
    events = [
        event
        for event in (decode(value, 1_765_000_000_000) for value in values)
        if not isinstance(event, Rejection)
    ]
    rows = [event_rows(event) for event in events]
    plan = reduce_batch(events, StoredState(), rows)
    counted = gc.get_count()[0]  # allocations less frees since the collection above
    assert plan.messages and counted > 0
    assert 2 * counted < collector.YOUNG_THRESHOLD, counted
