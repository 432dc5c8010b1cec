"""Readiness: the reasons /readyz gives."""

from __future__ import annotations

import time

from consumer.status import Readiness


def test_readiness_reasons() -> None:
    readiness = Readiness(stall_seconds=5)
    assert readiness.reasons_not_ready() == ["no partitions assigned"]
    readiness.assigned = frozenset({0})
    assert readiness.reasons_not_ready() == []
    readiness.database_ok = False
    assert readiness.reasons_not_ready() == ["database unreachable"]
    readiness.database_ok = True
    readiness.lag = 10
    readiness.last_progress = time.monotonic() - 6
    assert readiness.reasons_not_ready()[0].startswith("stalled: 10 records waiting")
    readiness.progressed()
    assert readiness.reasons_not_ready() == []
