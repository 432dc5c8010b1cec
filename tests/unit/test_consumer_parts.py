"""Pure parts of the consumer: error mapping, retry policy, readiness, dead-letter headers,
usage counters."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.errors import (
    PoisonError,
    Policy,
    TransientError,
    classify_database_error,
    database_away,
    sqlstate_policy,
)
from consumer.http.metrics import LedgerMetrics
from consumer.kafka import checkpoint as checkpoint_module
from consumer.kafka.checkpoint import Checkpoints
from consumer.kafka.closing import stop_consumer
from consumer.kafka.dead_letters import DETAIL_LIMIT, DeadLetter, dead_letter_headers
from consumer.ledger.claims import UsageChange
from consumer.retry import Backoff, retry_transient
from consumer.settings import load_settings
from consumer.status import Readiness
from producer.events import RejectReason


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


def test_readiness_reasons() -> None:
    readiness = Readiness(stall_seconds=5)
    assert readiness.reasons_not_ready() == ["no partitions assigned"]
    readiness.assigned = frozenset({0})
    assert readiness.reasons_not_ready() == []
    readiness.database_ok = False
    assert readiness.reasons_not_ready() == ["database unreachable"]
    readiness.database_ok = True
    readiness.lag = 10
    readiness.last_progress = time.monotonic() - 6
    assert readiness.reasons_not_ready()[0].startswith("stalled: 10 records waiting")
    readiness.progressed()
    assert readiness.reasons_not_ready() == []


def _record(**overrides: Any) -> ConsumerRecord:
    fields: dict[str, Any] = {
        "topic": "chat.turn-events",
        "partition": 2,
        "offset": 41,
        "timestamp": 0,
        "timestamp_type": 0,
        "key": b"42",
        "value": b"\xff raw",
        "checksum": None,
        "serialized_key_size": 2,
        "serialized_value_size": 5,
        "headers": (("trace", b"abc"), ("ledger.error.reason", b"stale")),
    }
    return ConsumerRecord(**{**fields, **overrides})


def test_dead_letter_headers() -> None:
    at = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)
    letter = DeadLetter(_record(), RejectReason.INVALID_UTF8, "é" * 2000)
    headers = dead_letter_headers(letter, at)
    as_dict = dict(headers)
    assert as_dict["ledger.error.reason"] == b"invalid_utf8"
    assert as_dict["ledger.source.topic"] == b"chat.turn-events"
    assert as_dict["ledger.source.partition"] == b"2"
    assert as_dict["ledger.source.offset"] == b"41"
    assert datetime.fromisoformat(as_dict["ledger.failed_at"].decode()) == at
    assert len(as_dict["ledger.error.detail"]) <= DETAIL_LIMIT
    as_dict["ledger.error.detail"].decode()  # cut on a character boundary
    # The original headers travel along; a stale ledger.* header from an earlier trip does not.
    assert ("trace", b"abc") in headers
    assert [v for k, v in headers if k == "ledger.error.reason"] == [b"invalid_utf8"]


def test_usage_counters_move_by_the_difference_and_never_down() -> None:
    metrics = LedgerMetrics()
    metrics.count_usage([UsageChange("m", 100, 50, 150, 1000)])
    metrics.count_usage([UsageChange("m", -40, 10, -30, -300)])
    value = metrics.registry.get_sample_value
    assert value("token_ledger_cost_micros_total", {"model": "m"}) == 1000
    assert value("token_ledger_cost_micros_reversed_total", {"model": "m"}) == 300
    assert value("token_ledger_tokens_total", {"model": "m", "kind": "completion"}) == 60
    assert value("token_ledger_tokens_reversed_total", {"model": "m", "kind": "prompt"}) == 40


class _CoordinatorGone:
    """The Kafka edge of the offset mirror when the group coordinator never answers."""

    async def commit(self, offsets: object) -> None:
        await asyncio.Event().wait()


async def test_the_offset_mirror_gives_up_instead_of_holding_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mirror is for lag tooling only: a commit that hangs must not hold the batch lock
    (every partition) or a shutdown with it."""
    monkeypatch.setattr(checkpoint_module, "MIRROR_SECONDS", 0.05)
    settings = load_settings(database_url="postgresql+asyncpg://ledger@127.0.0.1/ledger")
    checkpoints = Checkpoints(
        settings,
        cast(Any, _CoordinatorGone()),
        cast(Any, None),
        LedgerMetrics(),
        Readiness(stall_seconds=60),
        cast(Any, None),
    )
    checkpoints.positions = {0: 10}
    async with asyncio.timeout(10):  # a hang guard: the mirror itself gives up after 0.05 s
        await checkpoints.mirror()
    assert checkpoints._mirror.down


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


class _StrayCancel:
    """aiokafka's consumer whose fetcher, closing, awaits a fetch task cancelled in its retry
    backoff: the CancelledError escapes stop() without anyone cancelling the caller."""

    def __init__(self) -> None:
        self.client_closed = False
        self._client = self

    async def stop(self) -> None:
        retrying = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        retrying.cancel()
        await retrying

    async def close(self) -> None:
        self.client_closed = True


async def test_a_stray_cancellation_from_aiokafka_stop_does_not_escape() -> None:
    consumer = _StrayCancel()
    await stop_consumer(consumer)
    assert consumer.client_closed


async def test_cancelling_the_caller_of_stop_consumer_still_cancels_it() -> None:
    consumer = _StrayCancel()

    async def slow_stop() -> None:
        await asyncio.sleep(3600)

    consumer.stop = slow_stop  # type: ignore[method-assign]
    task = asyncio.create_task(stop_consumer(consumer))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not consumer.client_closed
