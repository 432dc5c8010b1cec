"""The metrics port under attack, against the consumer as a real process (real Kafka, real
PostgreSQL), from 127.0.0.1 only: slow and oversized clients cannot take the descriptors the
ledger needs, /healthz keeps answering, and a /readyz burst does not become database load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from consumer.http.server import HttpLimits
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from devstack.postgres import PostgresServer
from devstack.processes import free_port
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    expected_summary,
    ledger_summary,
    wait_for,
)

LIMITS = HttpLimits()  # the consumer's own
SLOW_CLIENTS = 2000
OVERSIZED_CLIENTS = 200
WAVES = 40  # the attack arrives over WAVES * WAVE_GAP seconds, not in one SYN burst
WAVE_GAP = 0.1
TRICKLE_SECONDS = 1.0  # a header line this often: well inside any per-line timeout
HELD_FOR_EVER = 15.0  # a client still held this long counts as held for ever
LEDGER_GROWTH = 4  # descriptors the ledger's own connections may add while it runs


@pytest.fixture
def enough_descriptors() -> Iterator[None]:
    """This process holds every attacking socket at once (plus the broker's and pytest's)."""
    needed = SLOW_CLIENTS + OVERSIZED_CLIENTS + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it to run this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class PortSockets:
    """Counts the descriptors of a process that are TCP sockets on one local port: the metrics
    port's listener and the connections it accepted. The ledger's own Kafka and database
    connections may legitimately grow during the attack (a pool connection, a new leader), so
    the cap is checked on these alone."""

    pid: int
    port: int
    # socket inode -> local port; None: in no TCP table (the event loop's self-pipe, a Unix
    # socket, or a socket closed since the listing: its inode is never used again)
    _local_ports: dict[str, int | None] = field(default_factory=dict)

    def count(self) -> int:
        inodes = self._socket_inodes()
        if not inodes <= self._local_ports.keys():
            self._learn(inodes)  # a socket not seen before; a read of /proc/net/tcp costs ~10 ms
        return sum(1 for inode in inodes if self._local_ports[inode] == self.port)

    def _socket_inodes(self) -> set[str]:
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed since the listing
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        return inodes

    def _learn(self, inodes: set[str]) -> None:
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{self.pid}/net/{table}")
            if not path.exists():
                continue  # tcp6 on a kernel without IPv6
            for line in path.read_text().splitlines()[1:]:
                columns = line.split()
                self._local_ports[columns[9]] = int(columns[1].rsplit(":", 1)[1], 16)
        for inode in inodes - self._local_ports.keys():
            self._local_ports[inode] = None


@dataclass
class Watch:
    """A thread of its own (so that the attackers' event loop cannot delay it) that samples
    the consumer's descriptors and asks /healthz, until stopped."""

    pid: int
    port: int
    peak_descriptors: int = 0
    peak_port_sockets: int = 0
    probes: list[float | None] = field(default_factory=list)  # seconds to a 200, None: failed
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        next_probe = 0.0
        port_sockets = PortSockets(self.pid, self.port)
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                self.peak_descriptors = max(self.peak_descriptors, descriptors(self.pid))
                self.peak_port_sockets = max(self.peak_port_sockets, port_sockets.count())
            if time.monotonic() >= next_probe:
                self.probes.append(self._healthz())
                next_probe = time.monotonic() + 0.1
            self._stop.wait(0.005)

    def _healthz(self) -> float | None:
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.settimeout(max(0.01, 1.0 - (time.monotonic() - started)))
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
        except OSError:
            return None
        if not answer.startswith(b"HTTP/1.1 200 ") or not answer.endswith(b"ok\n"):
            return None
        return time.monotonic() - started

    @contextlib.contextmanager
    def running(self) -> Iterator[Watch]:
        thread = threading.Thread(target=self.run, name="watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=5)


async def slow_client(port: int) -> float | None:
    """A request line, then a header line every TRICKLE_SECONDS until the server hangs up.
    Returns how long the server kept it, None if it could not connect at all."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError):
        return None
    started = time.monotonic()
    try:
        async with asyncio.timeout(HELD_FOR_EVER):
            writer.write(b"GET /metrics HTTP/1.1\r\n")
            line = 0
            while True:
                try:
                    async with asyncio.timeout(TRICKLE_SECONDS):
                        if not await reader.read(4096):
                            break  # the server closed it
                except TimeoutError:
                    line += 1
                    writer.write(b"X-Slow-%d: still coming\r\n" % line)
                    await writer.drain()
    except ConnectionError:
        pass  # reset by the server: closed too
    except TimeoutError:
        return HELD_FOR_EVER
    finally:
        writer.close()
    return time.monotonic() - started


async def oversized_client(port: int) -> tuple[float, bytes] | None:
    """A request with 32 KiB of headers, all at once; returns how long the server kept it and
    what it answered."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError):
        return None
    started = time.monotonic()
    answer = b""
    try:
        async with asyncio.timeout(HELD_FOR_EVER):
            writer.write(b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"b" * 32 * 1024 + b"\r\n\r\n")
            while chunk := await reader.read(4096):
                answer += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        return HELD_FOR_EVER, answer
    finally:
        writer.close()
    return time.monotonic() - started, answer


async def test_slow_and_oversized_clients_cannot_starve_the_ledger(
    kafka_bootstrap: str,
    ledger_url: str,
    processes: list[ConsumerProcess],
    enough_descriptors: None,
    tmp_path: Path,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, expect = plan_traffic(
        TrafficConfig(threads=120, turns_per_thread=4, seed=17, poison_rate=0, start=START)
    )
    half = len(records) // 2
    await stack.publish(records[:half])
    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log").start()
    processes.append(consumer)
    await wait_for(stack.caught_up, within=60, what="first half applied", context=consumer.logs)
    await wait_for(lambda: _ready(consumer), within=30, what="ready", context=consumer.logs)
    assert consumer.process is not None
    pid = consumer.process.pid
    port_sockets = PortSockets(pid, consumer.port)

    async def only_the_listener() -> bool:
        return port_sockets.count() == 1

    # The readiness probe's connection is closed a turn of the event loop after its answer.
    await wait_for(only_the_listener, within=10, what="the probes' connections closed")
    baseline = descriptors(pid)  # Kafka and database connections open, log, epoll, listener

    watch = Watch(pid, consumer.port)
    with watch.running():
        slow: list[asyncio.Task[float | None]] = []
        oversized: list[asyncio.Task[tuple[float, bytes] | None]] = []
        publishing = asyncio.create_task(stack.publish(records[half:]))
        for _ in range(WAVES):
            slow += [
                asyncio.create_task(slow_client(consumer.port))
                for _ in range(SLOW_CLIENTS // WAVES)
            ]
            oversized += [
                asyncio.create_task(oversized_client(consumer.port))
                for _ in range(OVERSIZED_CLIENTS // WAVES)
            ]
            await asyncio.sleep(WAVE_GAP)  # pacing the attack, not waiting for anything
        await publishing
        await wait_for(
            stack.caught_up, within=60, what="records published meanwhile", context=consumer.logs
        )
        held = [seconds for seconds in await asyncio.gather(*slow) if seconds is not None]
        refused = [r for r in await asyncio.gather(*oversized) if r is not None]

    # Every attacker got in (the kernel queues them) and was let go quickly: the slow ones at
    # the latest when their request deadline passed, though each kept sending.
    assert len(held) == SLOW_CLIENTS and len(refused) == OVERSIZED_CLIENTS
    assert max(held) < LIMITS.request_seconds + 2, sorted(held)[-10:]
    assert max(seconds for seconds, _ in refused) < LIMITS.request_seconds + 2
    answers = {answer.split(b"\r\n", 1)[0] for _, answer in refused}
    assert answers <= {b"", b"HTTP/1.1 431 Request Header Fields Too Large"}, answers

    # The metrics port never held more than the listener, the cap and the one connection being
    # decided on. (The descriptors in all are reported: the ledger's own connections may grow.)
    assert watch.peak_port_sockets <= 1 + LIMITS.max_connections + 1, (
        watch.peak_port_sockets,
        baseline,
        watch.peak_descriptors,
    )
    # /healthz answered throughout, each time within a second.
    assert len(watch.probes) >= 10
    failed = [p for p in watch.probes if p is None or p >= 1.0]
    assert failed == [], (len(failed), len(watch.probes))

    # Everything published during the attack is in the ledger.
    assert await ledger_summary(stack) == expected_summary(expect)
    _, metrics = consumer.http("/metrics")
    rejected = _samples(metrics, "token_ledger_http_connections_rejected_total")
    # Each attacking connection was turned away exactly once, and counted (the probes never).
    assert sum(rejected.values()) == SLOW_CLIENTS + OVERSIZED_CLIENTS, rejected
    assert rejected["too_large"] >= 1 and rejected["malformed"] == 0
    await wait_for(only_the_listener, within=10, what="every HTTP connection let go")
    # All of it let go, sockets a closed connection left open too (they are in no TCP table):
    # a few more descriptors only, the ledger's own connections (a pool's, a new leader's).
    assert descriptors(pid) <= baseline + LEDGER_GROWTH, (baseline, descriptors(pid))


async def _ready(consumer: ConsumerProcess) -> bool:
    return await consumer.status("/readyz") == 200


def _samples(exposition: str, name: str) -> dict[str, float]:
    """{reason: value} of a counter labelled by reason."""
    values = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            values[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    return values


# -- /readyz and the database ----------------------------------------------------------------


@pytest.fixture
async def postgres_counting_statements() -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own with pg_stat_statements loaded, so that the database
    itself says how many pings it got (the session's server cannot be restarted for that)."""
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-pg-statements-"))
    server = PostgresServer(workdir, port=free_port())
    try:
        await asyncio.to_thread(server.start)
        await _execute(server, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        await _execute(server, "CREATE EXTENSION pg_stat_statements")
        await asyncio.to_thread(upgrade, server.url)
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)


async def _execute(server: PostgresServer, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server.url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _pings(server: PostgresServer) -> int:
    """Executions of the readiness ping (`SELECT 1`, normalised by pg_stat_statements)."""
    conn = await asyncpg.connect(asyncpg_dsn(server.url))
    try:
        calls = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
            " WHERE query = 'SELECT $1' AND dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    return int(calls)


async def _get_readyz(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: burst\r\n\r\n")
        answer = await reader.read()
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def test_a_readyz_burst_costs_the_database_a_handful_of_pings(
    kafka_bootstrap: str,
    postgres_counting_statements: PostgresServer,
    processes: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, postgres_counting_statements.url)
    await stack.create_topic()
    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log").start()
    processes.append(consumer)
    await wait_for(lambda: _ready(consumer), within=60, what="ready", context=consumer.logs)
    before = await _pings(postgres_counting_statements)
    assert before >= 1  # the count sees the pings at all: /readyz above made one

    statuses: list[int] = []

    async def requester(count: int) -> None:
        for _ in range(count):
            statuses.append(await _get_readyz(consumer.port))

    # 1,000 requests from 25 concurrent clients: under the connection cap, so that every one
    # is answered and only the shared check, not the cap, can keep them from the database.
    started = time.monotonic()
    await asyncio.gather(*(requester(40) for _ in range(25)))
    elapsed = time.monotonic() - started

    assert statuses == [200] * 1000
    pings = await _pings(postgres_counting_statements) - before
    assert pings <= int(elapsed) + 2, (pings, elapsed)
