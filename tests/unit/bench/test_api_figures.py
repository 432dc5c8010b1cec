"""The benchmark's figures of the usage API (bench/api.py): the spaces its requests ask for,
their parameters, and the two targets (docs/development.md#benchmarks)."""

from __future__ import annotations

import pytest

from bench.api import MONTH, month_by_day_by_model, request_spaces
from bench.report import API, INDEX, INDEX_COST, LOST, TARGETS, Results, rate_lost


def test_requests_ask_for_distinct_spaces_each_run_another_draw() -> None:
    first = request_spaces(1000, 205, run=0)
    assert len(first) == len(set(first)) == 205
    assert all(1 <= space <= 1000 for space in first)
    assert request_spaces(1000, 205, run=0) == first  # the same in every benchmark
    assert request_spaces(1000, 205, run=1) != first
    # Fewer spaces than requests: every space, then again.
    few = request_spaces(3, 7, run=0)
    assert len(few) == 7 and set(few) == {1, 2, 3} and sorted(few[:3]) == [1, 2, 3]


def test_the_request_is_one_space_month_by_day_by_model() -> None:
    assert month_by_day_by_model(42) == {
        "space_id": 42,
        "from": "2026-11-01T00:00:00Z",
        "to": "2026-12-01T00:00:00Z",
        "group_by": ["day", "model"],
    }
    assert (MONTH[1] - MONTH[0]).days == 30


def _target(what: str, results: Results) -> tuple[float | None, bool | None]:
    (target,) = [t for t in TARGETS if t.what.startswith(what)]
    value = target.value(results, "candidate", "baseline")
    return value, None if value is None else target.met(value)


def test_the_api_targets_p99_and_the_index_cost_under_5_percent() -> None:
    results = Results()
    assert _target("usage API p99", results) == (None, None)
    assert _target(f"first drain's rate lost to {INDEX}", results) == (None, None)
    for p99 in (40.0, 120.0, 90.0):
        results.add(API, "p99 ms", p99, "candidate")
    assert _target("usage API p99", results) == (90.0, True)  # the median of the runs
    # Run by run: the pairs decide, not the medians of each side.
    for with_index, without in ((960.0, 1000.0), (700.0, 1000.0), (1020.0, 1000.0)):
        results.add(INDEX_COST, LOST, rate_lost(with_index, without), "candidate")
    value, met = _target(f"first drain's rate lost to {INDEX}", results)
    assert value == pytest.approx(4.0) and met is True
    results.add(INDEX_COST, LOST, rate_lost(900.0, 1000.0), "candidate")
    results.add(INDEX_COST, LOST, rate_lost(940.0, 1000.0), "candidate")
    value, met = _target(f"first drain's rate lost to {INDEX}", results)
    assert value == pytest.approx(6.0) and met is False


def test_the_rate_an_index_loses_is_in_percent_of_the_rate_without_it() -> None:
    assert rate_lost(950.0, 1000.0) == pytest.approx(5.0)
    assert rate_lost(1000.0, 1000.0) == 0
    assert rate_lost(1100.0, 1000.0) == pytest.approx(-10.0)  # faster with it: noise
