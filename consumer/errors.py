"""The consumer's error taxonomy. Driver errors are translated into these at one boundary each
(`classify_database_error` for asyncpg; consumer/kafka/dead_letters.py and the pipeline for aiokafka).

    LedgerError
    ├── TransientError      retry the whole batch with capped backoff; never dead-letter
    │   ├── ThreadRaceError     a thread appeared concurrently with another search space
    │   ├── ConcurrentWriteError  another writer took a row's key since the batch read it
    │   ├── DeadLetterUnavailableError  the dead-letter topic did not acknowledge (yet)
    │   └── UnexpectedError     anything nobody classified (a bug, a driver surprise): retried
    │                           with backoff, logged with its traceback, reported not-ready
    ├── FencedError         another owner moved the stored offsets: roll back and re-seek
    ├── PoisonError         this record (or the batch holding it) can never be applied:
    │                       split the batch until it is isolated, then dead-letter it
    └── DeadLetterRefusedError  the dead-letter topic refuses a record for good (too large,
                            not authorised): its partition stops, nothing is skipped

    BatchAbandoned          not a failure: the batch in flight was given up (rebalance or
                            shutdown while retrying); nothing was committed
    BatchTooSlow            not a failure: the batch keeps timing out; it is retried in halves

The SQLSTATE policy (docs/operations.md#database-errors-by-sqlstate) is the table `SQLSTATE_POLICY` below, by class or code.
"""

from __future__ import annotations

from enum import StrEnum

import asyncpg


class LedgerError(Exception):
    """Base of every error the consumer raises on purpose."""


class TopicConfigError(LedgerError):
    """A topic exists with settings the consumer cannot work with (an operator's fix)."""


class TransientError(LedgerError):
    def __init__(self, message: str, *, sqlstate: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.timed_out = timed_out  # a statement or client timeout: the batch may be too big


class ThreadRaceError(TransientError):
    pass


class ConcurrentWriteError(TransientError):
    """Another writer created a row this batch needed after the batch read the stored state;
    a retry reads it and decides again (e.g. rejects an event_id_conflict)."""


class DeadLetterUnavailableError(TransientError):
    """The dead-letter topic did not acknowledge; the batch waits and retries."""


class UnexpectedError(TransientError):
    """An exception nobody classified; the batch is retried rather than the process ended."""


# A connection failure, a server shutting down or refusing more connections: the database is
# away (logged as an outage, not ready). A deadlock, a timeout or a race is a retry, not that.
_AWAY_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def database_away(error: TransientError) -> bool:
    if isinstance(
        error, ThreadRaceError | ConcurrentWriteError | DeadLetterUnavailableError | UnexpectedError
    ):
        return False
    # No SQLSTATE: refused, reset or timed out connecting, or a client timeout on a hung server.
    return error.sqlstate == "" or error.sqlstate.startswith(_AWAY_STATES)


class DeadLetterRefusedError(LedgerError):
    """The dead-letter topic refused records for good; their partitions must stop."""

    def __init__(self, partitions: list[int], reason: str) -> None:
        super().__init__(f"dead-letter topic refuses records of partitions {partitions}: {reason}")
        self.partitions = partitions
        self.reason = reason


class BatchAbandoned(Exception):  # noqa: N818 - a control-flow signal, not a failure
    """The batch in flight was given up (partitions revoked or shutdown while retrying)."""


class BatchTooSlow(Exception):  # noqa: N818 - a control-flow signal, not a failure
    """The batch keeps timing out: commit it in halves."""


class FencedError(LedgerError):
    """The stored offsets no longer start where this batch does."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"offsets moved by another owner for partitions {partitions}")
        self.partitions = partitions


class PoisonError(LedgerError):
    def __init__(self, message: str, *, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class Policy(StrEnum):
    TRANSIENT = "transient"  # retry the batch with capped backoff, fetching paused
    HALVE = "halve"  # transient, and a batch that keeps failing so is retried in halves
    POISON = "poison"  # isolate the record by splitting the batch, then dead-letter it


# SQLSTATE (a full code, else its two-character class) -> what the consumer does.
SQLSTATE_POLICY: dict[str, Policy] = {
    "08": Policy.TRANSIENT,  # connection exception
    "40": Policy.TRANSIENT,  # transaction rollback: 40001 serialization, 40P01 deadlock
    "53": Policy.TRANSIENT,  # insufficient resources (disk full, out of memory, connections)
    "55P03": Policy.TRANSIENT,  # lock_not_available (lock_timeout)
    "57": Policy.TRANSIENT,  # operator intervention: 57P01..57P03 shutdown, restart
    "57014": Policy.HALVE,  # query_canceled: statement_timeout
    "58": Policy.TRANSIENT,  # system error (I/O)
    "XX000": Policy.TRANSIENT,  # internal_error
    "22": Policy.POISON,  # data exception
    # Program limits that the data reaches (54000 a value too large to print, 54001 a statement
    # too complex): the batch is split until the record is alone. The rest of class 54 (too
    # many columns or arguments) is the statement's own shape: not a record's fault.
    "54000": Policy.POISON,
    "54001": Policy.POISON,
    "23": Policy.POISON,  # integrity constraint violation
}


def sqlstate_policy(sqlstate: str) -> Policy | None:
    return SQLSTATE_POLICY.get(sqlstate) or SQLSTATE_POLICY.get(sqlstate[:2])


def classify_database_error(error: BaseException) -> LedgerError | None:
    """The project's view of a database-side failure, or None if it is not one."""
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = str(getattr(error, "sqlstate", "") or "")
        # The message of a 22/23 error can quote the offending value (chat text): keep only
        # the constraint or column it names.
        where = getattr(error, "constraint_name", None) or getattr(error, "column_name", None)
        summary = f"SQLSTATE {sqlstate} {type(error).__name__}" + (f" on {where}" if where else "")
        policy = sqlstate_policy(sqlstate)
        if policy is Policy.POISON:
            return PoisonError(summary, sqlstate=sqlstate)
        if policy is not None:
            return TransientError(summary, sqlstate=sqlstate, timed_out=policy is Policy.HALVE)
        return None
    if isinstance(error, TimeoutError):  # before OSError, its base class
        return TransientError("database timed out", timed_out=True)
    # The connection died under us: inside a statement, at COMMIT, in the transaction's exit
    # or the pool's release (asyncpg says "connection is closed" with an InterfaceError, and a
    # pooled connection whose server sent FATAL but has not closed yet raises an
    # InternalClientError "cannot switch to state ...").
    if isinstance(
        error, asyncpg.InterfaceError | asyncpg.InternalClientError | ConnectionError | OSError
    ):
        return TransientError(f"database unreachable: {type(error).__name__}")
    return None
