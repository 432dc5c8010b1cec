"""Driving the consumer as a real process against the real broker and database."""

from __future__ import annotations

import asyncio
import os
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
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.store import asyncpg_dsn
from devstack.processes import free_port
from producer.client import TurnEventProducer, ensure_topic
from producer.simulator import Expectation

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
            "LEDGER_GROUP_ID": self.group_id,
            "LEDGER_METRICS_HOST": "127.0.0.1",  # tests are never reachable from outside
            "LEDGER_METRICS_PORT": str(free_port()),
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


async def ledger_summary(stack: Stack) -> dict[str, Any]:
    """The ledger in the simulator's terms (Expectation.to_json)."""
    conn = await stack.connect()
    try:
        threads = await conn.fetchval("SELECT count(*) FROM chat_threads")
        messages = await conn.fetchval("SELECT count(*) FROM chat_messages")
        usage_rows = await conn.fetchval("SELECT count(*) FROM token_usage")
        per_model_rows = await conn.fetch(
            "SELECT b.key AS model,"
            " sum((b.value->>'prompt_tokens')::bigint) AS prompt_tokens,"
            " sum((b.value->>'completion_tokens')::bigint) AS completion_tokens,"
            " sum((b.value->>'total_tokens')::bigint) AS total_tokens,"
            " sum((b.value->>'cost_micros')::bigint) AS cost_micros"
            " FROM token_usage u, jsonb_each(u.model_breakdown) b GROUP BY b.key ORDER BY b.key"
        )
    finally:
        await conn.close()
    per_model = {
        r["model"]: {k: int(v) for k, v in dict(r).items() if k != "model"} for r in per_model_rows
    }
    return {
        "threads": threads,
        "messages": messages,
        "usage_rows": usage_rows,
        "per_model": per_model,
    }


def expected_summary(expect: Expectation) -> dict[str, Any]:
    data = expect.to_json()
    return {k: data[k] for k in ("threads", "messages", "usage_rows", "per_model")}


class ConsumerProcess:
    """`python -m consumer consume` as a child process with its own environment."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.port = int(env["LEDGER_METRICS_PORT"])
        self.log_path = log_path
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it while it runs
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "consume", *self.args],
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
