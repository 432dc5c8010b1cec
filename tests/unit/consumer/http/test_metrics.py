"""The usage counters: moved by differences, never down."""

from __future__ import annotations

from consumer.http.metrics import LedgerMetrics
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
