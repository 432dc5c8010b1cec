"""The usage counters: moved by differences, never down."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from consumer.http.metrics import LedgerMetrics, observe_many
from consumer.ledger.claims import UsageChange


def test_usage_counters_move_by_the_difference_and_never_down() -> None:
    metrics = LedgerMetrics()
    metrics.count_usage([UsageChange("m", 100, 50, 150, 1000)])
    metrics.count_usage([UsageChange("m", -40, 10, -30, -300)])
    value = metrics.registry.get_sample_value
    assert value("token_ledger_cost_micros_total", {"model": "m"}) == 1000
    assert value("token_ledger_cost_micros_reversed_total", {"model": "m"}) == 300
    assert value("token_ledger_tokens_total", {"model": "m", "kind": "completion"}) == 60
    assert value("token_ledger_tokens_reversed_total", {"model": "m", "kind": "prompt"}) == 40


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=10_000, allow_nan=False), max_size=40))
def test_observing_many_is_observing_one_by_one(values: list[float]) -> None:
    bounds = (0.05, 0.1, 1, 5, 3600)
    one, many = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("lag_seconds", "lag", buckets=bounds, registry=one)
    by_many = Histogram("lag_seconds", "lag", buckets=bounds, registry=many)
    for value in values:
        by_one.observe(value)
    observe_many(by_many, values)
    samples = [(s.name, s.labels, s.value) for m in one.collect() for s in m.samples]
    assert samples == [(s.name, s.labels, s.value) for m in many.collect() for s in m.samples]
