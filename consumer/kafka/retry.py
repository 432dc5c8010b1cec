"""Capped exponential backoff for transient failures (database down, deadlock, serialisation).

Only errors that `classify_database_error` calls transient (or that are `TransientError`s) are
retried; anything else propagates at once. The caller decides what "forever" means by passing
`attempts=None` (the consumer: never dead-letter because the database is down). `Retrier` is
the pipeline's policy on top: unexpected errors retried too, fetching paused meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.errors import (
    BatchAbandoned,
    BatchTooSlow,
    DeadLetterRefusedError,
    DeadLetterUnavailableError,
    FencedError,
    TransientError,
    UnexpectedError,
    classify_database_error,
    database_away,
)
from consumer.http.health import Readiness
from consumer.http.metrics import LedgerMetrics
from consumer.kafka.outages import Outage
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


class Retrier:
    """The pipeline's retry policy: transient failures, and unexpected ones, retried with
    capped backoff, fetching paused while it waits (whatever it runs for: a batch, loading
    offsets on assignment, following stored offsets when idle). Abandoned (BatchAbandoned)
    when the partitions are being given up or the consumer stops; a batch that keeps timing
    out (statement_timeout, a client timeout) raises BatchTooSlow when it can be split."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        readiness: Readiness,
        metrics: LedgerMetrics,
        backoff: Backoff,
        *,
        abandon: Callable[[], bool],
        held: Callable[[], Set[int]],
    ) -> None:
        self.consumer = consumer
        self.readiness = readiness
        self.metrics = metrics
        self.backoff = backoff
        self.abandon = abandon  # True: give up retrying (revoking, stopping)
        self.held = held  # partitions that stay paused whatever the retry did (opening)
        self.database = Outage("database")
        self.kafka = Outage("Kafka")

    async def __call__(
        self, operation: Callable[[], Awaitable[T]], *, splittable: bool = False
    ) -> T:
        paused: list[TopicPartition] = []
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
            self.readiness.unexpected = None
            self.database.recovered()
            self.readiness.database_ok = True
            return result

        def on_retry(error: TransientError, attempt: int, delay: float) -> None:
            nonlocal timeouts
            if self.abandon():
                raise BatchAbandoned from error
            if isinstance(error, UnexpectedError):
                self.readiness.unexpected = str(error)
                self.metrics.db_retries.labels("unexpected").inc()
            elif not isinstance(error, DeadLetterUnavailableError):
                if database_away(error):
                    self.readiness.database_ok = False
                    self.database.failing(str(error))
                self.metrics.db_retries.labels(error.sqlstate or "unavailable").inc()
            else:
                self.kafka.failing(str(error))
            timeouts = timeouts + 1 if error.timed_out else 0
            if splittable and timeouts >= TIMEOUTS_BEFORE_HALVING:
                raise BatchTooSlow from error
            if not paused:
                paused.extend(self.consumer.assignment())
                self.consumer.pause(*paused)
            log.debug(
                "transient failure, retrying",
                extra=fields(error=str(error), attempt=attempt, delay_seconds=round(delay, 2)),
            )

        try:
            return await retry_transient(attempt, self.backoff, on_retry)
        finally:
            halted, held = self.readiness.halted, self.held()
            if still := [
                tp
                for tp in paused
                if tp in self.consumer.assignment()
                and tp.partition not in halted
                and tp.partition not in held  # resumed once sought
            ]:
                self.consumer.resume(*still)
