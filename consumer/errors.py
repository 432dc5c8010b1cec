"""The consumer's error taxonomy. Driver errors are translated into these at one boundary each
(`classify_database_error` for asyncpg; the pipeline for aiokafka).

    LedgerError
    ├── TransientError      retry the whole batch with capped backoff; never dead-letter
    │   ├── ThreadRaceError     a thread appeared concurrently with another search space
    │   ├── ConcurrentWriteError  another writer took a row's key since the batch read it
    │   └── DeadLetterUnavailableError  the dead-letter topic did not acknowledge
    ├── FencedError         another owner moved the stored offsets: roll back and re-seek
    ├── PoisonError         this record (or the batch holding it) can never be applied:
    │                       split the batch until it is isolated, then dead-letter it
    └── InvariantError      the ledger's own assumptions broke: crash loudly

    BatchAbandoned          not a failure: the batch in flight was given up (rebalance or
                            shutdown while retrying); nothing was committed
"""

from __future__ import annotations

import asyncio

import asyncpg


class LedgerError(Exception):
    """Base of every error the consumer raises on purpose."""


class TransientError(LedgerError):
    def __init__(self, message: str, *, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ThreadRaceError(TransientError):
    pass


class ConcurrentWriteError(TransientError):
    """Another writer created a row this batch needed after the batch read the stored state;
    a retry reads it and decides again (e.g. rejects an event_id_conflict)."""


class DeadLetterUnavailableError(TransientError):
    """The dead-letter topic did not acknowledge; the batch waits and retries."""


class BatchAbandoned(Exception):  # noqa: N818 - a control-flow signal, not a failure
    """The batch in flight was given up (partitions revoked or shutdown while retrying)."""


class FencedError(LedgerError):
    """The stored offsets no longer start where this batch does."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"offsets moved by another owner for partitions {partitions}")
        self.partitions = partitions


class PoisonError(LedgerError):
    def __init__(self, message: str, *, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class InvariantError(LedgerError):
    pass


# 40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available,
# 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 53xxx resources.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03"}
_TRANSIENT_CLASSES = ("08", "53")
_POISON_CLASSES = ("22", "23")


def classify_database_error(error: BaseException) -> LedgerError | None:
    """The project's view of a database-side failure, or None if it is not one."""
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = str(getattr(error, "sqlstate", "") or "")
        # The message of a 22/23 error can quote the offending value (chat text): keep only
        # the constraint or column it names.
        where = getattr(error, "constraint_name", None) or getattr(error, "column_name", None)
        summary = f"SQLSTATE {sqlstate} {type(error).__name__}" + (f" on {where}" if where else "")
        if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_CLASSES):
            return TransientError(summary, sqlstate=sqlstate)
        if sqlstate.startswith(_POISON_CLASSES):
            return PoisonError(summary, sqlstate=sqlstate)
        return None
    if isinstance(
        error,
        asyncpg.ConnectionDoesNotExistError | ConnectionError | OSError | asyncio.TimeoutError,
    ):
        return TransientError(f"database unreachable: {type(error).__name__}")
    return None
