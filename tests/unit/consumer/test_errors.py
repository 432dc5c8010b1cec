"""The error taxonomy: driver errors mapped to transient, poison or not ours, and the SQLSTATE policy."""

from __future__ import annotations

import asyncpg
import pytest

from consumer.errors import (
    PoisonError,
    Policy,
    TransientError,
    classify_database_error,
    database_away,
    sqlstate_policy,
)


@pytest.mark.parametrize(
    ("error", "kind", "sqlstate"),
    [
        (asyncpg.DeadlockDetectedError("x"), TransientError, "40P01"),
        (asyncpg.SerializationError("x"), TransientError, "40001"),
        (asyncpg.AdminShutdownError("x"), TransientError, "57P01"),
        (asyncpg.ConnectionDoesNotExistError("x"), TransientError, "08003"),
        (asyncpg.TooManyConnectionsError("x"), TransientError, "53300"),
        (asyncpg.DiskFullError("x"), TransientError, "53100"),
        (asyncpg.QueryCanceledError("x"), TransientError, "57014"),
        (asyncpg.CannotConnectNowError("x"), TransientError, "57P03"),
        (asyncpg.PostgresIOError("x"), TransientError, "58030"),
        (asyncpg.InternalServerError("x"), TransientError, "XX000"),
        (asyncpg.LockNotAvailableError("x"), TransientError, "55P03"),
        (
            asyncpg.InterfaceError("cannot call Transaction.__aexit__(): connection is closed"),
            TransientError,
            "",
        ),
        (ConnectionRefusedError(), TransientError, ""),
        (TimeoutError(), TransientError, ""),
        (asyncpg.CheckViolationError("x"), PoisonError, "23514"),
        (asyncpg.UniqueViolationError("x"), PoisonError, "23505"),
        (asyncpg.NumericValueOutOfRangeError("x"), PoisonError, "22003"),
    ],
)
def test_database_errors_map_to_the_taxonomy(
    error: BaseException, kind: type[Exception], sqlstate: str
) -> None:
    mapped = classify_database_error(error)
    assert isinstance(mapped, kind)
    assert getattr(mapped, "sqlstate", "") == sqlstate


def test_timeouts_are_the_ones_that_halve_a_batch() -> None:
    statement_timeout = classify_database_error(asyncpg.QueryCanceledError("x"))
    client_timeout = classify_database_error(TimeoutError())
    deadlock = classify_database_error(asyncpg.DeadlockDetectedError("x"))
    assert isinstance(statement_timeout, TransientError) and statement_timeout.timed_out
    assert isinstance(client_timeout, TransientError) and client_timeout.timed_out
    assert isinstance(deadlock, TransientError) and not deadlock.timed_out


def test_the_sqlstate_policy_table_covers_every_class_the_spec_names() -> None:
    for code in ("08006", "40001", "40P01", "53200", "57P01", "57P02", "57P03", "58000", "XX000"):
        assert sqlstate_policy(code) is Policy.TRANSIENT, code
    assert sqlstate_policy("57014") is Policy.HALVE
    assert sqlstate_policy("22P02") is sqlstate_policy("23505") is Policy.POISON
    assert sqlstate_policy("42P01") is None  # a programming error: retried as unexpected


def test_programming_errors_are_not_mapped() -> None:
    assert classify_database_error(ValueError("bug")) is None
    assert classify_database_error(asyncpg.UndefinedTableError("x")) is None


def test_poison_summary_names_the_constraint_not_the_value() -> None:
    error = asyncpg.CheckViolationError("new row violates ... 'my secret text'")
    error.constraint_name = "ck_token_usage_cost_non_negative"
    summary = str(classify_database_error(error))
    assert "ck_token_usage_cost_non_negative" in summary
    assert "secret" not in summary


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (asyncpg.ConnectionDoesNotExistError("x"), True),
        (asyncpg.AdminShutdownError("x"), True),
        (asyncpg.TooManyConnectionsError("x"), True),
        (ConnectionRefusedError(), True),
        (asyncpg.QueryCanceledError("x"), False),  # statement_timeout: the batch, not the server
        (asyncpg.DeadlockDetectedError("x"), False),
        (asyncpg.SerializationError("x"), False),
        (asyncpg.LockNotAvailableError("x"), False),
    ],
)
def test_only_connection_failures_count_as_the_database_being_away(
    error: Exception, away: bool
) -> None:
    """A deadlock or a statement timeout is retried and counted, but is no outage: no
    'database unreachable' line, and /readyz stays ready."""
    transient = classify_database_error(error)
    assert isinstance(transient, TransientError)
    assert database_away(transient) is away
