"""Readiness: the reasons /readyz gives."""

from __future__ import annotations

import logging
import time

import pytest

from consumer.status import BACKLOG_LOG_SECONDS, Held, Readiness


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


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    caplog.clear()
    return lines


def test_a_stall_is_one_warning_when_it_starts_and_one_info_when_it_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="consumer.status")
    readiness = Readiness(stall_seconds=5, assigned=frozenset({0}), last_progress=clock.now)
    readiness.lag = 10
    clock.now += 3
    assert readiness.judge() == [] and _said(caplog) == []  # waiting, not stalled yet
    clock.now += 3
    assert readiness.judge()[0].startswith("stalled")
    assert _said(caplog) == [("WARNING", "stalled: records wait and nothing was committed")]
    for _ in range(5):  # judged every second while it lasts: said once
        clock.now += 1
        assert readiness.judge()
    assert _said(caplog) == []
    readiness.committed()
    assert readiness.judge() == []
    assert _said(caplog) == [("INFO", "stall over")]
    assert readiness.judge() == [] and _said(caplog) == []


def test_an_open_transaction_past_the_bound_is_logged_when_it_starts_and_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="consumer.status")
    readiness = Readiness(stall_seconds=5, assigned=frozenset({0, 1}))
    readiness.held = {1: Held(stable=10, records=4, since=clock.now)}
    assert readiness.judge() == [] and _said(caplog) == []
    clock.now += 6
    assert readiness.judge()[0].startswith("open transaction")
    readiness.judge()
    assert _said(caplog) == [("WARNING", "partitions held by an open transaction")]
    readiness.held = {}
    assert readiness.judge() == []
    assert _said(caplog) == [("INFO", "open transaction over")]


def test_a_long_backlog_says_when_it_is_caught_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="consumer.status")
    readiness = Readiness(stall_seconds=600, assigned=frozenset({0}), last_progress=clock.now)
    readiness.lag = 3  # a short one: ordinary traffic, nothing said
    readiness.judge()
    clock.now += 1
    readiness.lag = 0
    readiness.judge()
    assert _said(caplog) == []
    for lag in (5_000, 9_000, 2_000):  # a long one
        readiness.lag = lag
        readiness.judge()
        clock.now += BACKLOG_LOG_SECONDS / 2
    readiness.lag = 0
    readiness.judge()
    records = [r for r in caplog.records if r.getMessage() == "caught up: the backlog is applied"]
    assert [r.ledger_fields["most_records_waiting"] for r in records] == [9_000]  # type: ignore[attr-defined]
