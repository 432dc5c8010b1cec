"""The budgets the benchmark drains with (bench/budgets.py)."""

from __future__ import annotations

import json
import uuid

from bench.budgets import BUDGETS, PERIODS, SPACES, budget_rows, users_of

ALICE, BOB = uuid.UUID(int=101), uuid.UUID(int=102)


def record(space: object, user: object) -> tuple[bytes, bytes]:
    return b"k", json.dumps({"search_space_id": space, "user_id": str(user)}).encode()


def test_the_sample_users_are_read_once_each_and_poison_is_skipped() -> None:
    sample = [record(1, ALICE), (b"k", b"not json"), record(1, ALICE), record(2, BOB)]
    assert users_of(sample) == [(1, ALICE), (2, BOB)]


def test_ten_thousand_distinct_budgets_every_space_and_sample_user_covered() -> None:
    rows = budget_rows([(1, ALICE), (2, BOB)])
    assert len(rows) == len(set(rows)) == BUDGETS
    assert {(space, None, period) for space in SPACES for period in PERIODS} <= set(rows)
    assert {(1, ALICE, period) for period in PERIODS} <= set(rows)
    assert {(2, BOB, period) for period in PERIODS} <= set(rows)
