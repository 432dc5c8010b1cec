"""An external sort: items kept in memory up to a byte budget, then written out as sorted runs
to temporary files and read back merged. `verify` uses it to regroup a topic by thread with
bounded memory, whatever the topic's size."""

from __future__ import annotations

import heapq
import pickle
import struct
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

T = TypeVar("T")
RUN_BYTES = 16 * 1024 * 1024
MAX_RUNS = 128  # runs of one level; the next one merges them into one run of the level above
ITEM_OVERHEAD = 128  # bytes an item costs in memory beyond what `size` counts
RUN_READ_AHEAD = 64 * 1024  # memory per run while reading: the file's buffer and one item
_LENGTH = struct.Struct("<I")


class SpillFailedError(RuntimeError):
    """Writing a run failed earlier (e.g. the disk is full): the spill cannot give its items."""


class SortedSpill(Generic[T]):
    """Add items in any order, then iterate them once, sorted by `key` (stable: items with
    equal keys come back in the order they were added). The items must pickle.

    Memory: `run_bytes` of items while adding; while reading, one item and RUN_READ_AHEAD per
    run. Runs are merged in levels, `max_runs` of one level into one run of the next, so each
    item is rewritten once per level (log base max_runs of the runs), and at most
    `max_runs` - 1 runs per level wait on disk (`max_runs` while that level merges). Disk:
    the items, plus a level's worth while it is merged."""

    def __init__(
        self,
        key: Callable[[T], Any],
        size: Callable[[T], int],
        *,
        run_bytes: int = RUN_BYTES,
        max_runs: int = MAX_RUNS,
        directory: str | None = None,
    ) -> None:
        if max_runs < 2:
            raise ValueError(f"max_runs must be at least 2 to merge runs, not {max_runs}")
        self._key, self._size = key, size
        self._run_bytes, self._max_runs, self._directory = run_bytes, max_runs, directory
        self._buffer: list[T] = []
        self._buffered = 0
        # _levels[n]: runs of max_runs**n buffers each, oldest first. Every item of a higher
        # level was added before every item of a lower one (a level empties when it merges up).
        self._levels: list[list[IO[bytes]]] = []
        self._files: set[IO[bytes]] = set()  # every run not yet read to its end
        self._count = 0
        self._failed = False

    def __len__(self) -> int:
        return self._count

    @property
    def runs(self) -> int:
        """How many runs are on disk."""
        return sum(map(len, self._levels))

    def add(self, item: T) -> None:
        if self._failed:
            raise SpillFailedError("a run could not be written: the spill lost items")
        self._buffer.append(item)
        self._count += 1
        self._buffered += self._size(item) + ITEM_OVERHEAD
        if self._buffered >= self._run_bytes:
            try:
                self._spill_buffer()
            except BaseException:
                # A merge that fails has read its runs part way: no partial result is served.
                self._failed = True
                self.close()
                raise

    def _spill_buffer(self) -> None:
        run = self._write_run(sorted(self._buffer, key=self._key))
        self._buffer, self._buffered = [], 0
        level = 0
        while True:
            if level == len(self._levels):
                self._levels.append([])
            self._levels[level].append(run)
            if len(self._levels[level]) < self._max_runs:
                return
            full, self._levels[level] = self._levels[level], []
            run = self._write_run(self._merged(full))
            level += 1

    def __iter__(self) -> Generator[T]:
        """The items in key order; the spill is empty afterwards (its files are gone)."""
        if self._failed:
            raise SpillFailedError("a run could not be written: the spill lost items")
        buffered = sorted(self._buffer, key=self._key)
        self._buffer, self._buffered = [], 0
        runs = [run for level in reversed(self._levels) for run in level]  # oldest first
        self._levels = []
        if not runs:
            yield from buffered
            return
        # heapq.merge is stable across its inputs in argument order.
        yield from heapq.merge(self._merged(runs), iter(buffered), key=self._key)

    def close(self) -> None:
        """Release every run, also those an unfinished (or failed) iteration still holds."""
        for run in self._files:
            run.close()
        self._files, self._levels, self._buffer = set(), [], []

    def __enter__(self) -> SortedSpill[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_run(self, items: Iterable[T]) -> IO[bytes]:
        run = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 (closed by _read)
        self._files.add(run)
        try:
            for item in items:
                # One pickle per item: a shared Unpickler's memo would keep every item it read.
                data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
                run.write(_LENGTH.pack(len(data)))
                run.write(data)
            run.seek(0)
        except BaseException:
            self._release(run)
            raise
        return run

    def _merged(self, runs: list[IO[bytes]]) -> Iterator[T]:
        return heapq.merge(*(self._read(run) for run in runs), key=self._key)

    def _read(self, run: IO[bytes]) -> Iterator[T]:
        try:
            while header := run.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(header)
                yield pickle.loads(run.read(length))  # noqa: S301 (our own unlinked temporary file)
        finally:
            self._release(run)

    def _release(self, run: IO[bytes]) -> None:
        run.close()
        self._files.discard(run)
