"""Produce -> commit latency at a steady rate: a running consumer, records sent on a fixed
schedule, and the stored offsets polled every few milliseconds. A record's latency is from
just before its send to the first poll that sees its partition's next_offset past it (in the
ledger, by the same transaction that wrote its rows).

The schedule holds only if this process never stops for long: its cyclic garbage collector,
walking the growing list of sends, paused it for up to ~200 ms at a time (then the next
records go out in a burst, which the consumer meets as a backlog). So it is off while records
are sent, and `late_p99_ms` says how far behind its schedule the sending ran."""

from __future__ import annotations

import asyncio
import bisect
import gc
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer

from bench.backlog import create_topic
from bench.consumers import Consumer, stop, wait_ready
from consumer.ledger.database import asyncpg_dsn
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from devstack.processes import free_port

POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    records: int
    late_p99_ms: float  # how far behind schedule this process sent, p99


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least `share` of the values at
    or below it (p99 of 200 values: the 198th smallest; of 100, the 99th)."""
    if not values or not 0 < share <= 1:
        raise ValueError(f"a percentile in (0, 1] of some values, not {share} of {len(values)}")
    # Rounded first: 0.99 * 100 is 99.00000000000001 in floating point, whose ceiling is 100.
    rank = max(1, math.ceil(round(share * len(values), 9)))
    return sorted(values)[rank - 1]


async def produce_to_commit(consumer: Consumer, *, rate: int, seconds: float) -> Latency:
    await create_topic(consumer.services.bootstrap, consumer.topic, 3)
    planned, _ = plan_traffic(
        TrafficConfig(threads=int(rate * seconds / 12) + 1, seed=7, poison_rate=0)
    )
    planned = planned[: int(rate * seconds)]
    port = free_port()
    process, log = consumer.start("consume", metrics_port=port)
    seen: dict[int, list[tuple[float, int]]] = {}  # partition -> (time, next_offset) as polled
    sent: list[tuple[int, int, float]] = []  # (partition, offset, send time)
    late: list[float] = []  # per record, how long after its scheduled time it was sent
    try:
        await wait_ready(port)
        conn = await asyncpg.connect(asyncpg_dsn(consumer.database_url))
        polling = asyncio.Event()

        async def poll() -> None:
            while not polling.is_set():
                rows = await conn.fetch(
                    "SELECT partition, next_offset FROM consumer_offsets"
                    " WHERE group_id = $1 AND topic = $2",
                    consumer.group,
                    consumer.topic,
                )
                now = time.monotonic()
                for row in rows:
                    history = seen.setdefault(row["partition"], [])
                    if not history or history[-1][1] != row["next_offset"]:
                        history.append((now, row["next_offset"]))
                await asyncio.sleep(POLL_SECONDS)

        poller = asyncio.create_task(poll())
        # As TurnEventProducer sends: acks=all, idempotent, zstd, a 5 ms linger.
        producer = AIOKafkaProducer(
            bootstrap_servers=consumer.services.bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type="zstd",
            linger_ms=5,
        )
        await producer.start()
        gc.disable()
        try:
            acks = []
            started = time.monotonic()
            for index, (key, value) in enumerate(planned):
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                at = time.monotonic()
                late.append(at - (started + index / rate))
                future = await producer.send(consumer.topic, value, key=key)
                acks.append((future, at))
            for future, at in acks:
                metadata = await future
                sent.append((metadata.partition, metadata.offset, at))
        finally:
            gc.enable()
            await producer.stop()
        ends: dict[int, int] = {}
        for partition, offset, _ in sent:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        deadline = time.monotonic() + 60
        # The poller's view of another process's progress: nothing here to wait on but time.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            not seen.get(p) or seen[p][-1][1] < end for p, end in ends.items()
        ):
            await asyncio.sleep(0.1)
        polling.set()
        await poller
        await conn.close()
    finally:
        stop(process, log)
    latencies = []
    for partition, offset, at in sent:
        history = seen.get(partition, [])
        offsets = [next_offset for _, next_offset in history]
        index = bisect.bisect_right(offsets, offset)  # first next_offset > offset
        if index < len(history):
            latencies.append(history[index][0] - at)
    if len(latencies) < len(sent):
        raise RuntimeError(f"{len(sent) - len(latencies)} records never committed")
    return Latency(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=max(latencies) * 1000,
        records=len(latencies),
        late_p99_ms=percentile(late, 0.99) * 1000,
    )
