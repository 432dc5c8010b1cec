"""The external sort behind `verify`: sorted and stable whatever the number of runs on disk,
memory bounded by its budget, and no temporary file left behind."""

from __future__ import annotations

import io
import os
import tempfile
import tracemalloc
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.commands.spill import RUN_READ_AHEAD, SortedSpill, SpillFailedError

Item = tuple[int, int, bytes]


def _spill(directory: Path, run_bytes: int, max_runs: int = 64) -> SortedSpill[Item]:
    return SortedSpill[Item](
        key=itemgetter(0),
        size=lambda item: len(item[2]),
        run_bytes=run_bytes,
        max_runs=max_runs,
        directory=str(directory),
    )


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.integers(0, 20), max_size=300),
    run_bytes=st.integers(1, 2_000),
    max_runs=st.integers(2, 5),
)
def test_items_come_back_sorted_and_stable_from_any_number_of_runs(
    keys: list[int], run_bytes: int, max_runs: int
) -> None:
    directory = Path(tempfile.gettempdir())
    items = [(key, arrival, b"x" * (arrival % 7)) for arrival, key in enumerate(keys)]
    with _spill(directory, run_bytes, max_runs) as spill:
        for item in items:
            spill.add(item)
        assert len(spill) == len(items)
        # Stable: equal keys keep their arrival order (sorted() is stable too).
        assert list(spill) == sorted(items, key=itemgetter(0))


def test_a_small_budget_goes_to_disk_and_leaves_no_file(tmp_path: Path) -> None:
    spill = _spill(tmp_path, run_bytes=4_096, max_runs=4)
    for arrival in range(2_000):
        spill.add((-arrival, arrival, b"v" * 100))
    # ~110 runs written; four of a level merge into one of the next: at most 3 per level.
    assert 1 <= spill.runs <= 3 * 4
    # TemporaryFile is unlinked at once: the directory stays empty while the runs are open.
    assert list(tmp_path.iterdir()) == []
    merged = list(spill)
    assert [item[1] for item in merged] == list(range(1_999, -1, -1))
    assert spill.runs == 0


def test_memory_stays_within_the_budget_whatever_the_volume(tmp_path: Path) -> None:
    budget = 4 << 20
    volume = 96 << 20  # 24 times the budget
    value = b"c" * 4_000
    tracemalloc.start()
    try:
        spill = _spill(tmp_path, run_bytes=budget)
        for arrival in range(volume // len(value)):
            spill.add((arrival % 997, arrival, value[: 3_000 + arrival % 1_000]))
        _, adding_peak = tracemalloc.get_traced_memory()
        runs = spill.runs
        tracemalloc.reset_peak()
        previous = -1
        count = 0
        for key, _, _ in spill:
            assert key >= previous
            previous = key
            count += 1
        _, reading_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == volume // len(value)
    assert runs >= 20
    assert adding_peak < 2 * budget
    # Reading holds one item and the file's buffer per run.
    assert reading_peak < budget + runs * RUN_READ_AHEAD
    assert reading_peak < volume / 3


def test_an_abandoned_iteration_or_close_releases_the_runs(tmp_path: Path) -> None:
    spill = _spill(tmp_path, run_bytes=1_024)
    for arrival in range(500):
        spill.add((arrival % 10, arrival, b"z" * 50))
    assert spill.runs > 1
    reading = iter(spill)
    next(reading)
    reading.close()  # what garbage collection does to an abandoned generator
    spill.close()
    assert spill.runs == 0
    fresh = _spill(tmp_path, run_bytes=1_024)
    for arrival in range(500):
        fresh.add((arrival, arrival, b"z" * 50))
    fresh.close()
    assert fresh.runs == 0
    assert list(fresh) == []


def _bytes_written_per_item(items: int, monkeypatch: pytest.MonkeyPatch) -> float:
    written = 0
    real = tempfile.TemporaryFile

    class Counted(io.BufferedRandom):
        def write(self, data: Any) -> int:
            nonlocal written
            written += len(data)
            return super().write(data)

    def counted(**options: Any) -> IO[bytes]:
        file = real(**options)
        return Counted(io.FileIO(os.dup(file.fileno()), "r+b"))  # the name is already unlinked

    monkeypatch.setattr(tempfile, "TemporaryFile", counted)
    with SortedSpill[tuple[int, bytes]](
        key=itemgetter(0), size=lambda item: len(item[1]), run_bytes=10_000, max_runs=4
    ) as spill:
        for arrival in range(items):
            spill.add((arrival % 97, b"v" * 900))
        assert sum(1 for _ in spill) == items
    monkeypatch.undo()
    return written / items


def test_each_item_is_rewritten_once_per_level_not_once_per_merge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8 times the items: 180 -> 1,440 runs, 3.7 -> 5.2 levels of 4; merging every run into
    # one whenever there are 4 would write each item 8 times as often.
    small = _bytes_written_per_item(2_000, monkeypatch)
    large = _bytes_written_per_item(16_000, monkeypatch)
    assert large < 1.6 * small


def test_closing_releases_the_runs_of_a_failed_iteration(tmp_path: Path) -> None:
    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    kept = []

    def compare_and_fail() -> None:
        with _spill(tmp_path, run_bytes=1_000) as spill:
            for arrival in range(400):
                spill.add((arrival % 7, arrival, b"x" * 100))
            reading = iter(spill)
            next(reading)
            kept.append(reading)  # what a traceback's frame does with the reader
            raise RuntimeError("the database went away while comparing")

    with pytest.raises(RuntimeError):
        compare_and_fail()
    assert open_files() == before


def test_fewer_than_two_runs_per_level_cannot_merge(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_runs"):
        _spill(tmp_path, run_bytes=1, max_runs=1)


def test_a_failed_write_fails_the_spill_instead_of_losing_items(tmp_path: Path) -> None:
    """A full disk in the middle of a level's merge: its runs were read part way, so the
    spill refuses to hand out anything rather than a part of its items."""
    full_after = 5  # writes: add 0: a run; 1: a run and a merge; 2: a run; 3: a run, a merge
    written = 0

    class SmallDisk(SortedSpill[Item]):
        def _write_run(self, items: Any) -> IO[bytes]:
            nonlocal written
            written += 1
            if written > full_after:
                next(iter(items), None)  # a merge reads its runs before the write fails
                raise OSError(28, "No space left on device")
            return super()._write_run(items)

    spill = SmallDisk(
        key=itemgetter(0),
        size=lambda item: len(item[2]),
        run_bytes=1,
        max_runs=2,
        directory=str(tmp_path),
    )
    for arrival in range(3):
        spill.add((arrival, arrival, b""))
    with pytest.raises(OSError, match="No space"):
        spill.add((3, 3, b""))  # its own run written, the merge of two runs fails
    with pytest.raises(SpillFailedError):
        list(spill)
    with pytest.raises(SpillFailedError):
        spill.add((99, 99, b""))
