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
MAX_RUNS = 128  # open files while merging; past it the runs are merged into one first
ITEM_OVERHEAD = 128  # bytes an item costs in memory beyond what `size` counts
RUN_READ_AHEAD = 64 * 1024  # memory per run while reading: the file's buffer and one item
_LENGTH = struct.Struct("<I")


class SortedSpill(Generic[T]):
    """Add items in any order, then iterate them once, sorted by `key` (stable: items with
    equal keys come back in the order they were added). The items must pickle.

    Memory: `run_bytes` of items while adding; while reading, one item and RUN_READ_AHEAD per
    run (at most `max_runs`). Disk: the items, once (again while runs are merged)."""

    def __init__(
        self,
        key: Callable[[T], Any],
        size: Callable[[T], int],
        *,
        run_bytes: int = RUN_BYTES,
        max_runs: int = MAX_RUNS,
        directory: str | None = None,
    ) -> None:
        self._key, self._size = key, size
        self._run_bytes, self._max_runs, self._directory = run_bytes, max_runs, directory
        self._buffer: list[T] = []
        self._buffered = 0
        self._runs: list[IO[bytes]] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def runs(self) -> int:
        """How many runs went to disk so far."""
        return len(self._runs)

    def add(self, item: T) -> None:
        self._buffer.append(item)
        self._count += 1
        self._buffered += self._size(item) + ITEM_OVERHEAD
        if self._buffered >= self._run_bytes:
            self._write_run(sorted(self._buffer, key=self._key))
            self._buffer, self._buffered = [], 0
            if len(self._runs) >= self._max_runs:
                merged = self._merged(self._runs)
                self._runs = []
                self._write_run(merged)

    def __iter__(self) -> Generator[T]:
        """The items in key order; the spill is empty afterwards (its files are gone)."""
        buffered = sorted(self._buffer, key=self._key)
        self._buffer, self._buffered = [], 0
        if not self._runs:
            yield from buffered
            return
        runs, self._runs = self._runs, []
        # heapq.merge is stable across its inputs in argument order: runs hold older items.
        yield from heapq.merge(self._merged(runs), iter(buffered), key=self._key)

    def close(self) -> None:
        for run in self._runs:
            run.close()
        self._runs, self._buffer = [], []

    def __enter__(self) -> SortedSpill[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_run(self, items: Iterable[T]) -> None:
        run = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 (closed by _read)
        try:
            for item in items:
                # One pickle per item: a shared Unpickler's memo would keep every item it read.
                data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
                run.write(_LENGTH.pack(len(data)))
                run.write(data)
            run.seek(0)
        except BaseException:
            run.close()
            raise
        self._runs.append(run)

    def _merged(self, runs: list[IO[bytes]]) -> Iterator[T]:
        return heapq.merge(*(self._read(run) for run in runs), key=self._key)

    @staticmethod
    def _read(run: IO[bytes]) -> Iterator[T]:
        with run:
            while header := run.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(header)
                yield pickle.loads(run.read(length))  # noqa: S301 (our own unlinked temporary file)
