"""PostgreSQL restarted or stopped in the middle of a drain (issue #18).

A planned restart (`pg_ctl restart`, mode fast: every backend terminated with SQLSTATE 57P01,
its connection closed) is the most common database event. Wherever it hits the consumer —
inside a statement, at COMMIT (outcome unknown: the retry finds the offsets moved, is fenced
and reloads them), in the transaction's exit, between batches, on a connection idle in the
pool — the batch is retried, the process stays up and every record lands once; the outage is
two lines in the log, not one per retry. The same for a crash (`-m immediate`: no shutdown
checkpoint, recovery at start) and for a database stopped for a minute, during which fetching
is paused: memory stays flat and /readyz says why it is not ready.

Real processes throughout: the consumer (`python -m consumer consume`), the session's Kafka
broker, a PostgreSQL of the test's own to restart; two moments a restart only hits by chance
(a COMMIT whose answer is lost, a connection that has read its FATAL but not yet its close)
are made certain with a TCP proxy in front of the database (harness.PostgresProxy).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Literal

import pytest

from consumer.ledger.migrate import upgrade
from consumer.simulate.config import TrafficConfig
from consumer.simulate.expectation import Expectation
from consumer.simulate.traffic import plan_traffic
from devstack.postgres import PostgresServer
from devstack.processes import free_port
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    PostgresProxy,
    Stack,
    expected_summary,
    ledger_summary,
    log_messages,
    restart_postgres,
    rss_bytes,
    wait_for,
)

MiB = 1024 * 1024
# (shutdown mode, share of the backlog applied before it, then a pause): spread over the drain,
# and the pauses move each restart to another point of the batch cycle (inside a statement, at
# COMMIT, between batches). A fault schedule, not synchronisation.
RESTARTS: list[tuple[Literal["fast", "immediate"], float, float]] = [
    ("fast", 0.05, 0.0),
    ("fast", 0.15, 0.3),
    ("fast", 0.3, 0.15),
    ("immediate", 0.45, 0.2),
    ("fast", 0.6, 0.45),
    ("fast", 0.75, 0.6),
]
OUTAGE_SECONDS = 60.0  # the issue's "database stopped for a minute"
RSS_MARGIN = 30 * MiB


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own, so that it can be restarted and stopped; its log is
    kept next to the consumer's (what each backend was doing when it was terminated)."""
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-pg-restart-"))
    server = PostgresServer(workdir, port=free_port())
    server.start()
    await asyncio.to_thread(upgrade, server.url)
    yield server
    server.stop()
    shutil.copy(server.log_file, tmp_path / "postgres.log")
    shutil.rmtree(workdir, ignore_errors=True)


async def _backlog(stack: Stack, config: TrafficConfig) -> tuple[int, Expectation]:
    records, expect = await asyncio.to_thread(plan_traffic, config)
    await stack.publish(records)
    return len(records), expect


async def _applied(stack: Stack) -> int:
    """Records behind the stored offsets (no transactions here: offsets count records)."""
    return sum((await stack.stored_offsets()).values())


def _alive(consumer: ConsumerProcess) -> bool:
    assert consumer.process is not None
    return consumer.process.poll() is None


async def _ledger_is_exactly_the_topic(
    stack: Stack, expect: Expectation, consumer: ConsumerProcess
) -> None:
    """Every record applied once: the ledger is the simulator's, `verify` rebuilds the same
    ledger from the topic, the stored offsets are the ends of the partitions, and nothing was
    dead-lettered (poison_rate=0: a dead letter could only be a database failure taken for
    the record's fault)."""
    assert await ledger_summary(stack) == expected_summary(expect), consumer.logs()[-4000:]
    assert await stack.stored_offsets() == await stack.end_offsets()
    verified = await asyncio.to_thread(stack.cli, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert await stack.dead_letters() == []


def _outage_lines(consumer: ConsumerProcess) -> tuple[int, int]:
    """("database unreachable" lines, "database reachable again" lines) in the JSON log.

    And never an unexpected error: a dead connection, wherever it dies, is a transient
    failure of the database, not something nobody classified."""
    messages = log_messages(consumer.logs())
    unexpected = [m for m in messages if m.startswith("unexpected error")]
    assert unexpected == [], consumer.logs()[-4000:]
    return messages.count("database unreachable"), messages.count("database reachable again")


async def _metric(consumer: ConsumerProcess, name: str) -> float:
    """A counter of the consumer's /metrics, summed over its labels."""
    _, metrics = await asyncio.to_thread(consumer.http, "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


@pytest.mark.parametrize("max_batch", [50, 500])
async def test_restarts_fast_and_immediate_mid_drain_lose_and_duplicate_nothing(
    kafka_bootstrap: str,
    own_postgres: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
    max_batch: int,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    total, expect = await _backlog(
        stack,
        # Large enough that the last quarter outlasts the last pause (0.6 s) at the drain rate
        # of a fast machine: 500-record batches once drained 2,000 threads' last quarter in it.
        TrafficConfig(
            threads=2000 if max_batch <= 50 else 5000,
            turns_per_thread=4,
            seed=18,
            poison_rate=0,
            start=START,
        ),
    )
    consumer = ConsumerProcess(
        stack.env(
            LEDGER_MAX_BATCH=str(max_batch), LEDGER_STALL_SECONDS="600", LEDGER_LOG_LEVEL="DEBUG"
        ),
        tmp_path / "consumer.log",
    ).start()
    processes.append(consumer)
    timings = []
    for number, (mode, share, pause) in enumerate(RESTARTS, 1):
        await wait_for(
            partial(_progress, stack, int(share * total) - 1),
            within=180,
            what=f"{share:.0%} of the backlog applied (restart {number} after it)",
            context=consumer.logs,
        )
        await asyncio.sleep(pause)  # the fault schedule
        before = await _applied(stack)
        assert before < total, f"the drain ended before restart {number}: make the backlog larger"
        seconds = await asyncio.to_thread(restart_postgres, own_postgres, mode)
        timings.append((mode, before, round(seconds, 2)))
        assert _alive(consumer), consumer.logs()[-4000:]

    await wait_for(
        partial(_progress, stack, total - 1),
        within=240,
        what="the drain to end",
        context=consumer.logs,
    )
    assert _alive(consumer), consumer.logs()[-4000:]
    await _ledger_is_exactly_the_topic(stack, expect, consumer)

    # Each restart is at most one outage, logged when it starts and when it ends, however
    # many retries it took.
    unreachable, reachable = _outage_lines(consumer)
    retries = await _metric(consumer, "token_ledger_db_retries_total")
    print(f"restarts (mode, applied before, seconds): {timings}; {unreachable=} {retries=}")
    assert 1 <= unreachable <= len(RESTARTS), (timings, unreachable)
    assert reachable == unreachable, (timings, unreachable, reachable)
    assert retries >= unreachable
    code, seconds = consumer.terminate()
    assert code == 0, consumer.logs()[-4000:]
    assert seconds < 10


async def _progress(stack: Stack, beyond: int) -> bool:
    return await _applied(stack) > beyond


async def test_database_stopped_for_a_minute_mid_drain_waits_flat_and_catches_up(
    kafka_bootstrap: str,
    own_postgres: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    total, expect = await _backlog(
        stack,
        TrafficConfig(threads=600, turns_per_thread=4, seed=19, poison_rate=0, start=START),
    )
    consumer = ConsumerProcess(
        stack.env(LEDGER_MAX_BATCH="250", LEDGER_STALL_SECONDS="600"),
        tmp_path / "consumer.log",
    ).start()
    processes.append(consumer)
    assert consumer.process is not None
    await wait_for(
        partial(_progress, stack, 0), within=90, what="the first commit", context=consumer.logs
    )
    before = await _applied(stack)
    assert before < total, "the drain ended before the outage: make the backlog larger"

    await asyncio.to_thread(own_postgres.stop)
    stopped = time.monotonic()
    await wait_for(
        lambda: _not_ready_because_database(consumer), within=30, what="/readyz: database"
    )
    samples = [rss_bytes(consumer.process.pid)]
    while (left := OUTAGE_SECONDS - (time.monotonic() - stopped)) > 0:
        await asyncio.sleep(min(10.0, left))  # the outage's length: the fault, not a wait
        assert _alive(consumer), consumer.logs()[-4000:]
        assert await _not_ready_because_database(consumer)
        samples.append(rss_bytes(consumer.process.pid))
    assert await stack.dead_letters() == []  # nor take the outage for the records' fault
    growth = max(samples) - samples[0]
    print(f"VmRSS during the outage (MiB): {[round(s / MiB, 1) for s in samples]}")
    assert growth <= RSS_MARGIN, [round(s / MiB, 1) for s in samples]

    await asyncio.to_thread(own_postgres.start)
    await wait_for(stack.caught_up, within=120, what="the catch-up", context=consumer.logs)
    await wait_for(lambda: _ready(consumer), within=30, what="ready again")
    assert _alive(consumer)
    await _ledger_is_exactly_the_topic(stack, expect, consumer)
    assert _outage_lines(consumer) == (1, 1), consumer.logs()[-4000:]
    code, seconds = consumer.terminate()
    assert code == 0, consumer.logs()[-4000:]
    assert seconds < 10


async def _not_ready_because_database(consumer: ConsumerProcess) -> bool:
    status, body = await asyncio.to_thread(consumer.http, "/readyz")
    return status == 503 and "database unreachable" in body


async def _ready(consumer: ConsumerProcess) -> bool:
    return await consumer.status("/readyz") == 200


async def test_a_commit_whose_answer_is_lost_is_fenced_on_retry_and_applied_once(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """The COMMIT reached the server and committed, the connection died before its answer
    reached the consumer: the retry finds the offsets moved (compare-and-set), is fenced,
    reloads them and goes on from there; nothing is applied twice."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    total, expect = await _backlog(
        stack,
        TrafficConfig(threads=300, turns_per_thread=4, seed=20, poison_rate=0, start=START),
    )
    drops = 5
    async with PostgresProxy(ledger_url, lose_commit_answers=(4, drops)) as proxy:
        consumer = ConsumerProcess(
            stack.env(
                LEDGER_DATABASE_URL=proxy.url,
                LEDGER_MAX_BATCH="50",
                LEDGER_STALL_SECONDS="600",
                LEDGER_LOG_LEVEL="DEBUG",
                # The billing relay's transactions would take some of the lost answers.
                LEDGER_RELAY="false",
            ),
            tmp_path / "consumer.log",
        ).start()
        processes.append(consumer)
        await wait_for(stack.caught_up, within=180, what="the drain", context=consumer.logs)
        assert proxy.lost == drops, (proxy.commits, total)
        assert _alive(consumer), consumer.logs()[-4000:]
        await _ledger_is_exactly_the_topic(stack, expect, consumer)
        # One fenced retry per lost answer; each loss is one outage in the log.
        assert await _metric(consumer, "token_ledger_fenced_batches_total") == drops
        assert log_messages(consumer.logs()).count("batch fenced") == drops
        assert _outage_lines(consumer) == (drops, drops)
        # Off the event loop: the proxy serves the batch the consumer may finish on SIGTERM.
        code, _ = await asyncio.to_thread(consumer.terminate)
        assert code == 0, consumer.logs()[-4000:]


async def test_a_connection_terminated_idle_in_the_pool_is_a_database_failure(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """A restart terminates idle backends too: each sends its client a FATAL (57P01), then
    closes. asyncpg reads the FATAL first — the connection is unusable from then on
    (InternalClientError "cannot switch to state ...; another operation (2) is in progress")
    — and sees the close a moment later; a batch that takes the connection from the pool in
    between must meet a database failure (transient, one "database unreachable" line), not
    an unexpected error. The restarts above fall in that moment now and then; a late close
    (PostgresProxy's close_delay) makes it certain. The batch's lookup of the records applied
    before (ledger/applied.py) takes a connection first: when it is the one that meets the dead
    connection, it recognises nothing (a debug line) and the batch gets a live one, with no
    outage to report. Which of the two meets it depends on how many connections the pool held."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, expect = await asyncio.to_thread(
        plan_traffic,
        TrafficConfig(threads=60, turns_per_thread=3, seed=21, poison_rate=0, start=START),
    )
    half = len(records) // 2
    await stack.publish(records[:half])
    async with PostgresProxy(ledger_url, close_delay=10.0) as proxy:
        consumer = ConsumerProcess(
            stack.env(
                LEDGER_DATABASE_URL=proxy.url,
                LEDGER_STALL_SECONDS="600",
                LEDGER_LOG_LEVEL="DEBUG",
            ),
            tmp_path / "consumer.log",
        ).start()
        processes.append(consumer)
        await wait_for(stack.caught_up, within=90, what="the first half", context=consumer.logs)
        assert await _terminate_consumer_backends(stack), "the consumer holds no connection"
        await stack.publish(records[half:])
        await wait_for(stack.caught_up, within=90, what="the second half", context=consumer.logs)
        assert _alive(consumer), consumer.logs()[-4000:]
        await _ledger_is_exactly_the_topic(stack, expect, consumer)
        unreachable, reachable = _outage_lines(consumer)
        looked_up = [
            line
            for line in consumer.logs().splitlines()
            if "could not look up the records applied before" in line
            and '"error": "InternalClientError"' in line
        ]
        assert unreachable == reachable <= 1, consumer.logs()[-4000:]
        assert unreachable + len(looked_up) >= 1, consumer.logs()[-4000:]
        code, _ = await asyncio.to_thread(consumer.terminate)
        assert code == 0, consumer.logs()[-4000:]


async def test_readyz_answers_while_a_pooled_connection_has_read_its_fatal(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """/readyz pings the database through the consumer's pool. When the connection it takes
    has read its server's FATAL but not yet its close (the moment above), the ping raises
    asyncpg's InternalClientError: /readyz must still answer — 503 "database unreachable",
    then 200 once the pool has a new connection — not close without an answer. Three rounds:
    in each, the pipeline's idle sync may take the spoiled connection before the probe does."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = await asyncio.to_thread(
        plan_traffic,
        TrafficConfig(threads=20, turns_per_thread=2, seed=22, poison_rate=0, start=START),
    )
    await stack.publish(records)
    async with PostgresProxy(ledger_url, close_delay=10.0) as proxy:
        consumer = ConsumerProcess(
            stack.env(LEDGER_DATABASE_URL=proxy.url, LEDGER_STALL_SECONDS="600"),
            tmp_path / "consumer.log",
        ).start()
        processes.append(consumer)
        await wait_for(stack.caught_up, within=90, what="the backlog", context=consumer.logs)
        answers: list[tuple[int, str]] = []
        for _ in range(3):
            await wait_for(partial(_ready, consumer), within=30, what="ready")
            pids: list[int] = []

            async def terminated_some(pids: list[int] = pids) -> bool:
                pids += await _terminate_consumer_backends(stack)
                return bool(pids)

            # The pool may be empty for a moment (its spoiled connection closed, /readyz's
            # answer cached): the pipeline's idle sync opens one within seconds.
            await wait_for(terminated_some, within=30, what="a connection to terminate")
            # Gone: each has sent its FATAL, which the proxy passes on at once (the close it
            # passes on ten seconds later).
            await wait_for(partial(_backends_gone, stack, pids), within=30, what="backends gone")
            # /readyz reuses an answer for a second: ask until it has pinged again (an answer
            # other than "ready"), or until the pipeline's idle sync (every 2 s) must have
            # taken the spoiled connection instead.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                answers.append(await asyncio.to_thread(consumer.http, "/readyz"))
                if answers[-1][0] != 200:
                    break
                await asyncio.sleep(0.1)  # the poll interval
        assert all(status in (200, 503) for status, _ in answers), answers
        assert all("database unreachable" in body for status, body in answers if status == 503)
        assert "http request failed" not in log_messages(consumer.logs()), consumer.logs()[-4000:]
        assert _alive(consumer), consumer.logs()[-4000:]
        code, _ = await asyncio.to_thread(consumer.terminate)
        assert code == 0, consumer.logs()[-4000:]


async def _terminate_consumer_backends(stack: Stack) -> list[int]:
    """pg_terminate_backend every connection of the consumer to this test's database (as a
    restart does); returns their pids."""
    conn = await stack.connect()
    try:
        pids: list[int] = [
            row["pid"]
            for row in await conn.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name = 'token-ledger' AND datname = current_database()"
            )
        ]
        for pid in pids:  # one by one: a WHERE may call the function before filtering rows
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        return pids
    finally:
        await conn.close()


async def _backends_gone(stack: Stack, pids: list[int]) -> bool:
    conn = await stack.connect()
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])", pids
        )
        return bool(left == 0)
    finally:
        await conn.close()
