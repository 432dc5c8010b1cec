"""Driving the consumer as a real process against the real broker and database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.engine import make_url

from consumer.billing.relay import BILLING_PARTITIONS
from consumer.commands.queries import usage_report
from consumer.ledger.database import asyncpg_dsn
from consumer.simulate.expectation import Expectation
from devstack import demo
from devstack.postgres import PostgresServer, find_bindir
from devstack.processes import free_port
from producer.client import TurnEventProducer, ensure_topic
from producer.events import USAGE_MEASURES

REPO = Path(__file__).resolve().parents[2]


async def wait_for(
    condition: Callable[[], Awaitable[bool]],
    *,
    within: float = 60,
    what: str = "condition",
    context: Callable[[], str] | None = None,
) -> None:
    """Poll an observable condition until it holds (never a fixed sleep standing in for it).

    `context` (e.g. a consumer's log) is added to the error, to show why it never held."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            detail = f"\n{context()[-4000:]}" if context else ""
            raise TimeoutError(f"timed out after {within}s waiting for {what}{detail}")
        await asyncio.sleep(0.1)


@dataclass
class Stack:
    """One test's topics, consumer group and ledger database."""

    bootstrap: str
    database_url: str
    topic: str
    dlq_topic: str
    group_id: str
    partitions: int = 3

    @classmethod
    def fresh(cls, bootstrap: str, database_url: str, partitions: int = 3) -> Stack:
        name = f"it.{uuid.uuid4().hex[:10]}"
        return cls(bootstrap, database_url, name, f"{name}.dlq", f"group-{name}", partitions)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_KAFKA_BOOTSTRAP": self.bootstrap,
            "LEDGER_DATABASE_URL": self.database_url,
            "LEDGER_TOPIC": self.topic,
            "LEDGER_DLQ_TOPIC": self.dlq_topic,
            "LEDGER_BILLING_TOPIC": self.billing_topic,
            "LEDGER_BUDGET_TOPIC": self.budget_topic,
            "LEDGER_GROUP_ID": self.group_id,
            "LEDGER_METRICS_HOST": "127.0.0.1",  # tests are never reachable from outside
            "LEDGER_METRICS_PORT": str(free_port()),
            "LEDGER_RELAY_METRICS_PORT": str(free_port()),
            "LEDGER_LOG_FORMAT": "json",
            **extra,
        }

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`token-ledger ARGS` against this stack (`env`: extra LEDGER_* variables)."""
        return subprocess.run(
            [sys.executable, "-m", "consumer", *args],
            cwd=REPO,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    async def create_topic(self) -> None:
        await ensure_topic(self.bootstrap, self.topic, partitions=self.partitions)

    async def publish(self, records: list[tuple[bytes, bytes]]) -> None:
        await self.create_topic()
        async with TurnEventProducer(self.bootstrap, topic=self.topic) as producer:
            async for _ in producer.publish_records(records):
                pass

    @asynccontextmanager
    async def transactional_producer(
        self, name: str, **options: Any
    ) -> AsyncIterator[AIOKafkaProducer]:
        """A producer of the source topic that publishes in Kafka transactions, as a chat
        service may. A transaction left open is left as a crashed producer leaves it: the broker
        aborts it at the producer's transaction_timeout_ms."""
        await self.create_topic()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, transactional_id=f"{self.topic}.{name}", **options
        )
        await producer.start()
        try:
            yield producer
        finally:
            await producer.stop()

    async def publish_with_transactions(
        self, records: list[tuple[bytes, bytes]], ghosts: list[tuple[bytes, bytes]], chunk: int = 40
    ) -> None:
        """Publish `records`, in order, the way services with Kafka transactions would.

        Chunks alternate between a transaction that commits and a plain producer, which writes
        while that transaction is still open (so its records wait behind the transaction's); a
        second transaction, open across each pair and then aborted, carries a share of `ghosts`
        (usage, poison): not one of them may reach the ledger or the dead-letter topic."""
        pairs = range(0, len(records), 2 * chunk)
        share = -(-len(ghosts) // len(pairs))
        async with (
            TurnEventProducer(self.bootstrap, topic=self.topic) as plain,
            self.transactional_producer("committing") as committing,
            self.transactional_producer("aborting") as aborting,
        ):
            for index, start in enumerate(pairs):
                await committing.begin_transaction()
                await aborting.begin_transaction()
                await _send_all(committing, self.topic, records[start : start + chunk])
                await _send_all(aborting, self.topic, ghosts[index * share : (index + 1) * share])
                async for _ in plain.publish_records(records[start + chunk : start + 2 * chunk]):
                    pass
                await committing.commit_transaction()
                await aborting.abort_transaction()

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(asyncpg_dsn(self.database_url))

    async def stored_offsets(self) -> dict[int, int]:
        conn = await self.connect()
        try:
            rows = await conn.fetch(
                "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1",
                self.group_id,
            )
            return {r["partition"]: r["next_offset"] for r in rows}
        finally:
            await conn.close()

    async def end_offsets(self, topic: str | None = None) -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap)
        await consumer.start()
        try:
            name = topic or self.topic
            count = self.partitions if name == self.topic else 1
            ends = await consumer.end_offsets([TopicPartition(name, p) for p in range(count)])
            return {tp.partition: offset for tp, offset in ends.items()}
        finally:
            await consumer.stop()

    async def caught_up(self) -> bool:
        """The ledger holds every record a read_committed reader can reach.

        The stored offset is the last applied record + 1, so it may point at a transaction's
        commit or abort marker, or at aborted records: from it to the last stable offset there
        must be nothing left to read (an open transaction's records are not reachable yet)."""
        stored = await self.stored_offsets()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            stable = await consumer.end_offsets(partitions)  # read_committed: the LSO
            behind = {tp: stored.get(tp.partition, 0) for tp in partitions}
            behind = {tp: offset for tp, offset in behind.items() if offset < stable[tp]}
            if not behind:
                return True
            consumer.assign(list(behind))
            for tp, offset in behind.items():
                consumer.seek(tp, offset)
            while behind:
                batch = await consumer.getmany(*behind, timeout_ms=1000)
                if any(r.offset < stable[tp] for tp, rs in batch.items() for r in rs):
                    return False
                behind = {
                    tp: o for tp, o in behind.items() if await consumer.position(tp) < stable[tp]
                }
            return True
        finally:
            await consumer.stop()

    @property
    def billing_topic(self) -> str:
        return f"{self.topic}.billing"

    @property
    def budget_topic(self) -> str:
        return f"{self.topic}.budget-alerts"

    async def budget_alerts(self) -> list[Any]:
        """Every record of the budget alert topic, partition by partition, in offset order."""
        return await self.billing_records(self.budget_topic)

    async def billing_records(self, topic: str | None = None) -> list[Any]:
        """Every record of the billing topic (or `topic`, another the relay writes),
        partition by partition, in offset order."""
        topic = topic or self.billing_topic
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            if topic not in await consumer.topics():
                return []  # no relay ever ran
            partitions = [TopicPartition(topic, p) for p in range(BILLING_PARTITIONS)]
            ends = await consumer.end_offsets(partitions)
            wanted = {tp: end for tp, end in ends.items() if end > 0}
            consumer.assign(list(wanted))
            for tp in wanted:
                await consumer.seek_to_beginning(tp)
            records: list[Any] = []
            while len(records) < sum(wanted.values()):  # single writer, no transactions
                batch = await consumer.getmany(timeout_ms=1000)
                records += [r for rs in batch.values() for r in rs]
            return sorted(records, key=lambda r: (r.partition, r.offset))
        finally:
            await consumer.stop()

    async def dead_letters(self) -> list[Any]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            tp = TopicPartition(self.dlq_topic, 0)
            end = (await consumer.end_offsets([tp]))[tp]
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            records: list[Any] = []
            while len(records) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                records += batch.get(tp, [])
            return records
        finally:
            await consumer.stop()


async def _send_all(
    producer: AIOKafkaProducer, topic: str, records: list[tuple[bytes, bytes]]
) -> None:
    """Send and wait for every acknowledgement (inside the producer's transaction)."""
    acks = [await producer.send(topic, value, key=key) for key, value in records]
    await asyncio.gather(*acks)


def restart_postgres(server: PostgresServer, mode: Literal["fast", "immediate"]) -> float:
    """`pg_ctl restart -m MODE` of a test's own server; returns the seconds it took.

    fast: backends are terminated (SQLSTATE 57P01), a shutdown checkpoint is written, and the
    server starts again; immediate: every process is killed (SIGQUIT) and the start recovers
    from the WAL. Either way pg_ctl returns once the server accepts connections again. The
    server log goes to its file (without -l the postmaster would inherit pg_ctl's stdout)."""
    started = time.monotonic()
    result = subprocess.run(
        [
            *_as_service_user(),
            str(find_bindir() / "pg_ctl"),
            "-D",
            str(server.datadir),
            "-l",
            str(server.log_file),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "restart",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pg_ctl restart -m {mode} failed:\n{result.stderr}")
    return time.monotonic() - started


def _as_service_user() -> list[str]:
    """Like devstack: initdb, pg_ctl and postgres refuse to run as root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


# asyncpg ends a transaction with the simple query "COMMIT;": 'Q', int32 length, text, NUL.
_COMMIT_MESSAGE = b"Q\x00\x00\x00\x0cCOMMIT;\x00"


class PostgresProxy:
    """A TCP proxy in front of PostgreSQL, for the network's share of database faults.

    lose_commit_answers=(every, at_most): every `every`-th COMMIT (up to `at_most` of them)
    reaches the server, which commits it and answers; the proxy cuts the connection instead
    of passing the answer on. The client cannot know the outcome of its COMMIT (what a
    restart or a network failure at that moment leaves it with), though it is durable.

    close_delay: when the server closes a connection, the client hears of it that much later
    (whatever the server said last, e.g. its FATAL on termination, passes at once). A lost or
    late FIN; also the widest form of the window every client has between reading a
    server's last words and seeing its socket close."""

    def __init__(
        self,
        database_url: str,
        *,
        lose_commit_answers: tuple[int, int] = (1, 0),
        close_delay: float = 0.0,
    ) -> None:
        self.database_url = make_url(database_url)
        self.upstream = (self.database_url.host or "127.0.0.1", self.database_url.port or 5432)
        self.every, self.at_most = lose_commit_answers
        self.close_delay = close_delay
        self.commits = 0  # COMMITs seen
        self.lost = 0  # answers to a COMMIT lost
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The database URL, through this proxy."""
        proxied = self.database_url.set(host="127.0.0.1", port=self.port)
        return proxied.render_as_string(hide_password=False)

    async def __aenter__(self) -> PostgresProxy:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()  # ends both pumps of every connection
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=10)
        await self._server.wait_closed()

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        this = asyncio.current_task()
        assert this is not None
        self._handlers.add(this)
        self._writers.add(client_writer)
        server_writer: asyncio.StreamWriter | None = None
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(server_writer)
            await self._pump(client_reader, client_writer, server_reader, server_writer)
        except OSError:
            pass  # either side went away: so does the other
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
                    self._writers.discard(writer)
            self._handlers.discard(this)

    async def _pump(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        lose_answer = asyncio.Event()

        async def upstream() -> None:  # client -> server
            while data := await client_reader.read(65536):
                if _COMMIT_MESSAGE in data:
                    self.commits += 1
                    if self.commits % self.every == 0 and self.lost < self.at_most:
                        lose_answer.set()
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:  # server -> client
            while data := await server_reader.read(65536):
                if lose_answer.is_set():
                    self.lost += 1  # committed on the server, never heard of by the client
                    return
                client_writer.write(data)
                await client_writer.drain()
            await asyncio.sleep(self.close_delay)  # the server has closed: tell the client later

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


def rss_bytes(pid: int) -> int:
    """A process's resident set size (VmRSS in /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # "VmRSS:	  123456 kB"
    raise RuntimeError(f"no VmRSS for process {pid}")


def log_messages(log: str) -> list[str]:
    """The msg field of every JSON line of a consumer's log (LEDGER_LOG_FORMAT=json)."""
    messages = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a traceback or a line not written by the logger
        if isinstance(entry, dict) and isinstance(entry.get("msg"), str):
            messages.append(entry["msg"])
    return messages


async def ledger_summary(stack: Stack) -> dict[str, Any]:
    """The ledger in the simulator's terms (Expectation.to_json); per model by the attribution
    rule, as `token-ledger usage --by model` reports it, '(unattributed)' included."""
    conn = await stack.connect()
    try:
        threads = await conn.fetchval("SELECT count(*) FROM chat_threads")
        messages = await conn.fetchval("SELECT count(*) FROM chat_messages")
        usage_rows = await conn.fetchval("SELECT count(*) FROM token_usage")
        by_model = await usage_report(conn, ["model"])
    finally:
        await conn.close()
    per_model = {row["model"]: {name: row[name] for name in USAGE_MEASURES} for row in by_model}
    return {
        "threads": threads,
        "messages": messages,
        "usage_rows": usage_rows,
        "per_model": per_model,
    }


def expected_summary(expect: Expectation) -> dict[str, Any]:
    data = expect.to_json()
    return {k: data[k] for k in ("threads", "messages", "usage_rows", "per_model")}


async def kept_unknown_fields(stack: Stack) -> dict[str, int]:
    """What the ledger kept of the fields the simulator's producers add and this consumer does
    not know, in the terms of Expectation.kept_unknown_fields (what `make demo` checks too)."""
    conn = await stack.connect()
    try:
        return await demo.kept_unknown_fields(conn)
    finally:
        await conn.close()


class ConsumerProcess:
    """`python -m consumer consume` (or another command) as a child process with its own
    environment."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *args: str, command: str = "consume"
    ) -> None:
        self.env = env
        self.command = command
        # `token-ledger relay` serves on its own port.
        self.port = int(
            env["LEDGER_RELAY_METRICS_PORT" if command == "relay" else "LEDGER_METRICS_PORT"]
        )
        self.log_path = log_path
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it while it runs
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", self.command, *self.args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0, ""

    async def status(self, path: str) -> int:
        return (await asyncio.to_thread(self.http, path))[0]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until it exited)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        return code, time.monotonic() - started

    def wait(self, timeout: float = 120) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop_quietly(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def said(line: str) -> str:
    """A line a command ended on, as its text form `token-ledger: <message>`: under
    LEDGER_LOG_FORMAT=json (the stacks' default) it is a JSON object with that message."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    if isinstance(entry, dict) and "exit_code" in entry:
        return f"token-ledger: {entry['msg']}"
    return line


def metric_samples(consumer: ConsumerProcess) -> dict[str, float]:
    """The consumer's token_ledger_* samples, by series (name and labels)."""
    status, text = consumer.http("/metrics")
    return {
        series: float(value)
        for line in (text.splitlines() if status == 200 else [])
        if line.startswith("token_ledger_")
        for series, value in [line.rsplit(" ", 1)]
    }


def metric_total(samples: dict[str, float], name: str, *labels: str) -> float:
    return sum(
        value
        for series, value in samples.items()
        if re.fullmatch(rf"{name}(\{{.*\}})?", series) and all(x in series for x in labels)
    )
