"""What the chaos run watches while it runs: per partition the stored offset against the
log's end (lag, and how long a partition with records to read made no progress), and each
live consumer's /metrics and /readyz (counters for the summary; text for the canary check).

Samples that fail because the broker or the database is down are skipped: the monitor must
outlive every fault it watches."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.ledger.database import asyncpg_dsn
from tests.chaos.fleet import Fleet
from tests.integration.harness import Stack


@dataclass
class PartitionWatch:
    stored: int = -1
    end: int = 0
    since: float = field(default_factory=time.monotonic)  # last progress, or caught up
    max_stall: float = 0.0
    stalled_at: tuple[float, float] = (0.0, 0.0)  # the longest stall: from, to (monotonic)


@dataclass
class Monitor:
    stack: Stack
    fleet: Fleet
    secrets: dict[str, str]
    partitions: dict[int, PartitionWatch] = field(default_factory=dict)
    max_lag: int = 0
    leaks: list[str] = field(default_factory=list)  # where a secret showed
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # process -> sample
    scrapes: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        consumer: AIOKafkaConsumer | None = None
        conn: asyncpg.Connection | None = None
        last_scrape = 0.0
        try:
            while not stop.is_set():
                try:
                    if consumer is None:
                        consumer = AIOKafkaConsumer(
                            bootstrap_servers=self.stack.bootstrap, request_timeout_ms=3000
                        )
                        await asyncio.wait_for(consumer.start(), 5)
                    if conn is None or conn.is_closed():
                        conn = await asyncio.wait_for(
                            asyncpg.connect(asyncpg_dsn(self.stack.database_url)), 5
                        )
                    await asyncio.wait_for(self._sample(consumer, conn), 5)
                except Exception:  # noqa: BLE001 - any failure a fault causes: skip the sample
                    if consumer is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(consumer.stop(), 5)
                        consumer = None
                    if conn is not None:
                        conn.terminate()
                        conn = None
                if time.monotonic() - last_scrape > 2:
                    last_scrape = time.monotonic()
                    await self.scrape()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 5)
            if conn is not None:
                conn.terminate()

    async def _sample(self, consumer: AIOKafkaConsumer, conn: asyncpg.Connection) -> None:
        tps = [TopicPartition(self.stack.topic, p) for p in range(self.stack.partitions)]
        ends = await consumer.end_offsets(tps)
        rows = await conn.fetch(
            "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1",
            self.stack.group_id,
        )
        stored = {row["partition"]: row["next_offset"] for row in rows}
        now = time.monotonic()
        lag = 0
        for tp in tps:
            watch = self.partitions.setdefault(tp.partition, PartitionWatch())
            offset, end = stored.get(tp.partition, 0), ends[tp]
            if offset != watch.stored or offset >= end:
                watch.since = now  # progress, or nothing to read: not stalled
            watch.stored, watch.end = offset, end
            if now - watch.since > watch.max_stall:
                watch.max_stall, watch.stalled_at = now - watch.since, (watch.since, now)
            lag += max(0, end - offset)
        self.max_lag = max(self.max_lag, lag)

    @property
    def max_stall(self) -> float:
        return max((w.max_stall for w in self.partitions.values()), default=0.0)

    async def scrape(self) -> None:
        """/metrics and /readyz of every live consumer: counters kept, secrets looked for."""
        for member in list(self.fleet.slots.values()):
            for path in ("/metrics", "/readyz"):
                status, text = await asyncio.to_thread(member.process.http, path)
                if not status:
                    continue
                self.scrapes += 1
                self.look_for_secrets(f"{member.name} {path}", text)
                if path == "/metrics":
                    self.counters[member.name] = _counters(text)

    def look_for_secrets(self, where: str, text: str) -> None:
        for what, secret in self.secrets.items():
            if secret in text:
                self.leaks.append(f"{what} in {where}")

    def counter(self, name: str, *labels: str) -> int:
        """A counter summed over every process and every series with `labels` (`k="v"`), as
        last scraped: what a process counted after its last scrape before a kill is lost, so
        this is a lower bound."""
        return int(
            sum(
                value
                for sample in self.counters.values()
                for key, value in sample.items()
                if key.partition("{")[0] == name and all(label in key for label in labels)
            )
        )


def _counters(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            found[name] = float(value)
    return found
