"""Retry policy, and nothing else: capped exponential backoff for transient failures (database
down, deadlock, serialisation).

Only errors that `classify_database_error` calls transient (or that are `TransientError`s) are
retried; anything else propagates at once. The caller decides what "forever" means by passing
`attempts=None` (the consumer: never dead-letter because the database is down). `Retrier` is
the pipeline's policy on top: unexpected errors retried too, a retry given up when the
partitions are being given up, a batch that keeps timing out split. What a retry means to
others is done by whoever owns it, as a `RetryObserver`: readiness and the outage log
(consumer/status.py), the metrics (consumer/http/metrics.py), paused fetching
(consumer/kafka/pausing.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from consumer.errors import (
    BatchAbandoned,
    BatchTooSlow,
    DeadLetterRefusedError,
    FencedError,
    TransientError,
    UnexpectedError,
    classify_database_error,
)
from consumer.logs import fields

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUTS_BEFORE_HALVING = 2


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


class RetryObserver(Protocol):
    """What a retry means to someone else: retrying* then finished, once per outermost call
    (every caller holds the pipeline's batch lock, so calls do not overlap; one made inside
    another would be part of it)."""

    def retrying(self, error: TransientError) -> None:
        """An attempt failed and another follows after a backoff."""

    def succeeded(self) -> None:
        """An attempt succeeded."""

    def finished(self) -> None:
        """The retried operation returned or raised, whatever the outcome."""


class Retrier:
    """The pipeline's retry policy: transient failures, and unexpected ones (logged with their
    traceback, then retried as UnexpectedError), retried with capped backoff. Abandoned
    (BatchAbandoned) when `abandon()` says the partitions are being given up or the consumer
    stops; a batch that keeps timing out (statement_timeout, a client timeout) raises
    BatchTooSlow when it can be split. Fenced batches, abandonment and refused dead letters
    pass through at once."""

    def __init__(
        self,
        backoff: Backoff,
        *,
        abandon: Callable[[], bool],
        observers: Sequence[RetryObserver] = (),
    ) -> None:
        self.backoff = backoff
        self.abandon = abandon  # True: give up retrying (revoking, stopping)
        self.observers = list(observers)
        self._depth = 0  # calls in progress: observers hear `finished` when the last ends

    async def __call__(
        self, operation: Callable[[], Awaitable[T]], *, splittable: bool = False
    ) -> T:
        timeouts = 0

        async def attempt() -> T:
            try:
                result = await operation()
            except (FencedError, BatchAbandoned, BatchTooSlow, DeadLetterRefusedError):
                raise
            except Exception as error:
                if as_transient(error) is not None:
                    raise
                log.exception(
                    "unexpected error: the batch will be retried",
                    extra=fields(error=type(error).__name__),
                )
                raise UnexpectedError(f"unexpected {type(error).__name__}") from error
            for observer in self.observers:
                observer.succeeded()
            return result

        def on_retry(error: TransientError, attempt: int, delay: float) -> None:
            nonlocal timeouts
            if self.abandon():
                raise BatchAbandoned from error
            for observer in self.observers:
                observer.retrying(error)
            timeouts = timeouts + 1 if error.timed_out else 0
            if splittable and timeouts >= TIMEOUTS_BEFORE_HALVING:
                raise BatchTooSlow from error
            log.debug(
                "transient failure, retrying",
                extra=fields(error=str(error), attempt=attempt, delay_seconds=round(delay, 2)),
            )

        self._depth += 1
        try:
            return await retry_transient(attempt, self.backoff, on_retry)
        finally:
            self._depth -= 1
            if self._depth == 0:
                for observer in self.observers:
                    observer.finished()
