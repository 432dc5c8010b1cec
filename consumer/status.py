"""What every layer reports and /readyz, the log and `consume --until-idle` read: the bottom of
the package: it imports nothing of it but the error taxonomy and the log's field helper.

- `Readiness`: the consumer's state as /readyz judges it, written by the pipeline, its
  checkpoints and retries, the schema check and the billing relay.
- `Held`: a partition whose records wait behind a transaction a producer left open.
- `Outage`: one dependency's availability as a handful of log lines (once when it starts
  failing, a reminder at most once a minute, once when it ends), not one per retry
  (docs/operations.md#outages).
- `RetryStatus`: what the pipeline's retries mean to those two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from consumer.errors import (
    DeadLetterUnavailableError,
    TransientError,
    UnexpectedError,
    database_away,
)
from consumer.logs import fields

log = logging.getLogger(__name__)
REMINDER_SECONDS = 60.0
# A backlog this long is worth a line when it is applied; shorter ones are ordinary traffic.
BACKLOG_LOG_SECONDS = 10.0


@dataclass(frozen=True)
class Held:
    """A partition whose records above its last stable offset wait for a transaction to end."""

    stable: int  # the last stable offset
    records: int  # high watermark - stable
    since: float  # time.monotonic() when the last stable offset came to stand at `stable`


@dataclass
class Readiness:
    """What the pipeline reports and /readyz judges; times are time.monotonic()."""

    stall_seconds: float
    consumes: bool = True  # False: `token-ledger relay` alone, which is assigned no partitions
    assigned: frozenset[int] = frozenset()
    lag: int = 0
    lag_complete: bool = True  # every partition of this member counted in `lag`
    last_progress: float = field(default_factory=time.monotonic)  # a commit, or nothing waiting
    last_commit: float = 0.0
    database_ok: bool = True
    # Not lag (nothing there can be read yet), so judged on its own: partition -> its records
    # waiting for an open transaction, and since when its last stable offset has stood still.
    held: dict[int, Held] = field(default_factory=dict)
    kafka_ok: bool = True
    halted: dict[int, str] = field(default_factory=dict)  # partition -> why it stopped
    unexpected: str | None = None  # the batch is being retried after an unexpected error
    # Billing revisions the relay holds back (refused by the topic, or no record can be built
    # from them): revision id -> why. Their messages' later revisions wait behind them.
    billing_held: dict[str, str] = field(default_factory=dict)

    # What judge() last said, so that each condition is logged when it starts and ends.
    _stalled_since: float | None = field(default=None, init=False, repr=False)
    _held_logged: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    # (since, most records waiting) while lag > 0
    _backlog: tuple[float, int] | None = field(default=None, init=False, repr=False)

    def progressed(self) -> None:
        """Nothing is waiting (idle is not stalled)."""
        self.last_progress = time.monotonic()

    def committed(self) -> None:
        self.last_progress = self.last_commit = time.monotonic()

    def set_lag(self, records: int, *, complete: bool) -> None:
        """The records waiting; `complete` False when some partition of this member could not
        be counted (opening, revoked, stopped): a lag that fell then is not a backlog applied."""
        self.lag = records
        self.lag_complete = complete

    def judge(self) -> list[str]:
        """The reasons not to be ready (empty: ready), and the log lines they call for: a stall
        or a partition held by an open transaction is one WARNING when it starts and one INFO
        when it ends; a backlog that took BACKLOG_LOG_SECONDS or more is one INFO once it is
        applied. Called every second by the readiness watch and by each /readyz."""
        reasons = self.reasons_not_ready()
        now = time.monotonic()
        self._log_stall(now)
        self._log_held(now)
        self._log_backlog(now)
        return reasons

    def _log_stall(self, now: float) -> None:
        stalled = self.lag > 0 and now - self.last_progress > self.stall_seconds
        if stalled and self._stalled_since is None:
            self._stalled_since = self.last_progress
            log.warning(
                "stalled: records wait and nothing was committed",
                extra=fields(records=self.lag, seconds=round(now - self.last_progress)),
            )
        elif not stalled and self._stalled_since is not None:
            if self.last_commit > self._stalled_since:
                log.info("stall over", extra=fields(seconds=round(now - self._stalled_since, 1)))
            else:  # nothing committed: the waiting partitions left this member, or stopped
                log.info(
                    "stall over: the partitions that waited were revoked or stopped",
                    extra=fields(seconds=round(now - self._stalled_since, 1)),
                )
            self._stalled_since = None

    def _log_held(self, now: float) -> None:
        held = frozenset(p for p, h in self.held.items() if now - h.since > self.stall_seconds)
        if started := held - self._held_logged:
            log.warning(
                "partitions held by an open transaction",
                extra=fields(
                    partitions=sorted(started),
                    records=sum(self.held[p].records for p in started),
                    seconds=round(now - min(self.held[p].since for p in started)),
                ),
            )
        if ended := self._held_logged - held:
            log.info("open transaction over", extra=fields(partitions=sorted(ended)))
        self._held_logged = held

    def _log_backlog(self, now: float) -> None:
        if self.lag > 0:
            since, most = self._backlog or (now, 0)
            self._backlog = (since, max(most, self.lag))
        elif self._backlog is not None:
            since, most = self._backlog
            self._backlog = None
            # Not when partitions left the count (revoked, opening, stopped): not applied.
            if self.lag_complete and now - since >= BACKLOG_LOG_SECONDS:
                log.info(
                    "caught up: the backlog is applied",
                    extra=fields(seconds=round(now - since, 1), most_records_waiting=most),
                )

    def reasons_not_ready(self) -> list[str]:
        reasons = []
        if self.consumes and not self.assigned:
            reasons.append("no partitions assigned")
        if not self.database_ok:
            reasons.append("database unreachable")
        if not self.kafka_ok:
            reasons.append("Kafka unreachable")
        if self.unexpected:
            reasons.append(f"retrying a batch after an {self.unexpected} (see the log)")
        for partition, why in sorted(self.halted.items()):
            reasons.append(f"partition {partition} stopped: {why}")
        for revision, why in sorted(self.billing_held.items()):
            reasons.append(f"billing revision {revision} held back: {why} (see the log)")
        if self.lag > 0 and time.monotonic() - self.last_progress > self.stall_seconds:
            reasons.append(
                f"stalled: {self.lag} records waiting, no commit for {self.stall_seconds:.0f}s"
            )
        if held := {
            p: h for p, h in self.held.items() if time.monotonic() - h.since > self.stall_seconds
        }:
            reasons.append(
                f"open transaction: {sum(h.records for h in held.values())} records wait on"
                f" partition {', '.join(map(str, sorted(held)))} behind a transaction open for"
                f" over {self.stall_seconds:.0f}s (the broker aborts it at the producer's"
                " transaction timeout)"
            )
        return reasons


class Outage:
    """One dependency's availability, for the log and for /readyz."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self._last_line = 0.0
        self._attempts = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failing(self, detail: str) -> None:
        now = time.monotonic()
        self._attempts += 1
        if self.since is None:
            self.since = self._last_line = now
            log.warning(f"{self.what} unreachable", extra=fields(error=detail))
        elif now - self._last_line >= REMINDER_SECONDS:
            self._last_line = now
            log.warning(
                f"{self.what} still unreachable",
                extra=fields(
                    error=detail, seconds=round(now - self.since), attempts=self._attempts
                ),
            )

    def recovered(self) -> None:
        if self.since is not None:
            log.info(
                f"{self.what} reachable again",
                extra=fields(seconds=round(time.monotonic() - self.since, 1)),
            )
            self.since = None
            self._attempts = 0


class RetryStatus:
    """What the pipeline's retries mean to /readyz and the log (a consumer/retry.py
    RetryObserver): the database or the dead-letter topic away is an outage; an unexpected
    error is a reason not to be ready until an attempt succeeds."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self.database = Outage("database")
        self.kafka = Outage("Kafka")

    def retrying(self, error: TransientError) -> None:
        if isinstance(error, UnexpectedError):
            self.readiness.unexpected = str(error)
        elif isinstance(error, DeadLetterUnavailableError):
            self.kafka.failing(str(error))
        elif database_away(error):
            self.readiness.database_ok = False
            self.database.failing(str(error))

    def succeeded(self) -> None:
        self.readiness.unexpected = None
        self.database.recovered()
        self.readiness.database_ok = True

    def finished(self) -> None:
        pass
