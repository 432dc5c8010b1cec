"""The budget rules (consumer/billing/budget_rules.py): UTC periods, exact crossings, the alert a
change emits, and the values `budget set` refuses."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.billing.budget_rules import (
    TOTAL_START,
    Budget,
    alert_id,
    alerts,
    check_limits,
    crossed,
    judge,
    parse_thresholds,
    period_start,
    spends_by_period,
)

USER = uuid.UUID("0b6f3c1e-2f44-4d8e-9a77-3f1c2e5d9b10")


def test_the_last_millisecond_of_a_month_and_the_first_of_the_next_are_two_periods() -> None:
    last = datetime(2026, 11, 30, 23, 59, 59, 999000, tzinfo=UTC)
    first = datetime(2026, 12, 1, tzinfo=UTC)
    assert period_start("day", last) == datetime(2026, 11, 30, tzinfo=UTC)
    assert period_start("day", first) == first
    assert period_start("month", last) == datetime(2026, 11, 1, tzinfo=UTC)
    assert period_start("month", first) == first
    assert period_start("total", last) == period_start("total", first) == TOTAL_START


def test_periods_are_utc_whatever_the_zone_of_the_instant() -> None:
    tokyo = datetime(
        2026, 12, 1, 8, 0, tzinfo=timezone(timedelta(hours=9))
    )  # 23:00 UTC the day before
    assert period_start("day", tokyo) == datetime(2026, 11, 30, tzinfo=UTC)


def test_a_threshold_is_crossed_at_exactly_its_share_of_the_limit() -> None:
    assert not crossed(799, 1000, 80)
    assert crossed(800, 1000, 80)
    assert crossed(3, 3, 100)
    assert not crossed(2, 3, 67)  # 200 < 201: two thirds is under 67 %
    assert not crossed(10**20, None, 1)


@given(st.integers(0, 10**15), st.integers(1, 10**15), st.integers(1, 1000))
def test_crossing_is_exact_integer_arithmetic(spend: int, limit: int, threshold: int) -> None:
    assert crossed(spend, limit, threshold) == (spend / limit * 100 >= threshold) or (
        spend * 100 == limit * threshold  # only float rounding could disagree, at the boundary
    )


def test_a_change_of_state_emits_one_alert_and_no_change_none() -> None:
    limits = {("cost_micros", 50): 1000, ("cost_micros", 80): 1000, ("total_tokens", 80): 10}
    before = judge({"cost_micros": 600, "total_tokens": 9}, limits)
    after = judge({"cost_micros": 700, "total_tokens": 8}, limits)
    assert before == after
    assert alerts(before, after) == {}
    over = judge({"cost_micros": 850, "total_tokens": 8}, limits)
    assert alerts(after, over) == {("cost_micros", 80): "crossed"}
    assert alerts(over, after) == {("cost_micros", 80): "withdrawn"}
    assert alerts({}, over) == {
        ("cost_micros", 50): "crossed",
        ("cost_micros", 80): "crossed",
        ("total_tokens", 80): "crossed",
    }


def test_the_alert_id_names_the_period_by_its_utc_date() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert alert_id(7, start, "cost_micros", 80, 3) == "7:2026-12-01:cost_micros:80:3"
    assert alert_id(7, TOTAL_START, "total_tokens", 100, 1) == "7:0001-01-01:total_tokens:100:1"


def test_thresholds_parse_sorted_and_distinct_and_bad_ones_say_why() -> None:
    assert parse_thresholds("100, 50,80,80") == (50, 80, 100)
    assert parse_thresholds("1000") == (1000,)
    for text, said in (
        ("1001", "1001 % is not within"),
        ("0", "0 %"),
        ("x", "integers"),
        ("", "at least"),
    ):
        with pytest.raises(ValueError, match=said):
            parse_thresholds(text)


def test_a_budget_needs_a_positive_limit() -> None:
    check_limits(1, None)
    check_limits(None, 5)
    with pytest.raises(ValueError, match="give a limit"):
        check_limits(None, None)
    with pytest.raises(ValueError, match="--cost-micros -5: a limit is a positive"):
        check_limits(-5, 10)


def test_a_user_budget_counts_only_its_user_and_a_space_budget_every_user() -> None:
    space = Budget(1, 7, None, "day", 100, None, (80,))
    user = Budget(2, 7, USER, "day", 100, None, (80,))
    day = datetime(2026, 12, 1, 12, tzinfo=UTC)
    usage = [(7, USER, day, 10, 1), (7, None, day, 5, 1), (8, USER, day, 1000, 1)]
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert spends_by_period(space, usage) == {start: {"cost_micros": 15, "total_tokens": 2}}
    assert spends_by_period(user, usage) == {start: {"cost_micros": 10, "total_tokens": 1}}
    assert user.limits() == {("cost_micros", 80): 100}
