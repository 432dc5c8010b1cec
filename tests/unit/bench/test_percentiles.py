"""The benchmark's percentiles, by nearest rank (docs/development.md#benchmarks)."""

from __future__ import annotations

import random

import pytest

from bench.latency import percentile


def test_percentiles_are_nearest_rank() -> None:
    hundred = [float(v) for v in range(1, 101)]
    random.Random(3).shuffle(hundred)
    # 0.99 * 100 is 99.00000000000001 in floating point: still the 99th value, not the 100th.
    assert percentile(hundred, 0.99) == 99
    assert percentile(hundred, 0.5) == 50
    assert percentile(hundred, 1.0) == 100
    assert percentile(hundred, 0.001) == 1
    assert percentile([float(v) for v in range(1, 201)], 0.99) == 198
    assert percentile([7.0], 0.99) == 7.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="percentile"):
            percentile(hundred, bad)
    with pytest.raises(ValueError, match="percentile"):
        percentile([], 0.5)
