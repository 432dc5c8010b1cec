"""Capped exponential backoff for transient failures (database down, deadlock, serialisation).

Only errors that `classify_database_error` calls transient (or that are `TransientError`s) are
retried; anything else propagates at once. The caller decides what "forever" means by passing
`attempts=None` (the consumer: never dead-letter because the database is down).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from consumer.errors import TransientError, classify_database_error

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.05
    maximum: float = 5.0
    multiplier: float = 2.0
    attempts: int | None = None  # None: until it works (or the task is cancelled)

    def delay(self, attempt: int) -> float:
        """Full jitter: spreads competing writers apart after a deadlock."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrets


def as_transient(error: BaseException) -> TransientError | None:
    if isinstance(error, TransientError):
        return error
    mapped = classify_database_error(error)
    return mapped if isinstance(mapped, TransientError) else None


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    backoff: Backoff = Backoff(),
    on_retry: Callable[[TransientError, int, float], None] | None = None,
) -> T:
    """Run `operation` until it succeeds; transient failures wait and retry."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except Exception as error:
            transient = as_transient(error)
            if transient is None or (backoff.attempts is not None and attempt >= backoff.attempts):
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(transient, attempt, delay)
            await asyncio.sleep(delay)
