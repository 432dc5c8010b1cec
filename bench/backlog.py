"""A simulated backlog on a topic of its own: the simulator's realistic traffic (duplicates,
retries, legacy appends, v0 re-sends, unknown fields, shuffles, poison: 0.5 % of the records
by default), planned and published in chunks of threads so that a million records never sit in
memory at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer.client import TurnEventProducer

THREADS_PER_CHUNK = 2_000  # about 25,000 records
RECORDS_PER_THREAD = 12.7  # what the simulator's defaults give (5 turns a thread), poison aside
TURNS_PER_THREAD = TrafficConfig.turns_per_thread


@dataclass
class Backlog:
    topic: str
    partitions: int
    records: int = 0
    poison: int = 0  # of the records, those planned as poison (each one dead letter)
    sample: list[tuple[bytes, bytes]] = field(default_factory=list)  # the first records, in order


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
    finally:
        await admin.close()


async def publish_backlog(
    bootstrap: str,
    topic: str,
    *,
    records: int,
    partitions: int,
    sample: int,
    seed: int = 1,
    poison_rate: float = TrafficConfig.poison_rate,
) -> Backlog:
    """At least `records` simulated records on a new topic; keeps the first `sample` of them."""
    await create_topic(bootstrap, topic, partitions)
    backlog = Backlog(topic, partitions)
    chunk = 0
    async with TurnEventProducer(bootstrap, topic=topic) as producer:
        while backlog.records < records:
            left = records - backlog.records
            per_thread = RECORDS_PER_THREAD + poison_rate * TURNS_PER_THREAD
            threads = min(THREADS_PER_CHUNK, int(left / per_thread) + 1)
            # Each chunk its own seed: thread ids are random 62-bit numbers, never shared.
            planned, expected = plan_traffic(
                TrafficConfig(threads=threads, seed=seed * 1000 + chunk, poison_rate=poison_rate)
            )
            chunk += 1
            backlog.poison += expected.dead_letters
            if len(backlog.sample) < sample:
                backlog.sample.extend(planned[: sample - len(backlog.sample)])
            async for acked in producer.publish_records(planned):
                backlog.records += acked
    return backlog
