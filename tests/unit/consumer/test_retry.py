"""Retry policy: transient failures waited out with capped backoff, the rest let through."""

from __future__ import annotations

import asyncpg
import pytest

from consumer.retry import Backoff, retry_transient


async def test_retry_waits_out_transient_failures() -> None:
    attempts: list[int] = []
    retried: list[tuple[str, int]] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise asyncpg.DeadlockDetectedError("deadlock")
        return "done"

    result = await retry_transient(
        flaky,
        Backoff(initial=0.001, maximum=0.002),
        on_retry=lambda error, attempt, delay: retried.append((error.sqlstate, attempt)),
    )
    assert result == "done"
    assert retried == [("40P01", 1), ("40P01", 2)]


async def test_retry_lets_permanent_errors_through_at_once() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.CheckViolationError("no")

    with pytest.raises(asyncpg.CheckViolationError):
        await retry_transient(broken, Backoff(initial=0.001))
    assert calls == 1


async def test_retry_gives_up_after_its_attempts() -> None:
    async def down() -> None:
        raise ConnectionRefusedError

    with pytest.raises(ConnectionRefusedError):
        await retry_transient(down, Backoff(initial=0.001, maximum=0.001, attempts=3))


def test_backoff_is_capped_and_grows() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0)
    assert 0.05 <= backoff.delay(1) <= 0.1
    assert 0.5 <= backoff.delay(10) <= 1.0
