"""`token-ledger status`: where each partition of the group stands, on one screen
(docs/operations.md#status).

Per partition: the stored offset (PostgreSQL's consumer_offsets, the truth), the log's high
watermark and last stable offset, the lag between them, and whether a consumer stopped the
partition and why (partition_halts). Then the Kafka group's members as the broker describes
them, best effort: a broker that will not say is one field, never a failed command.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError, for_code

from consumer.commands.reading import database, reader, topic_partitions
from consumer.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    stored: int | None  # consumer_offsets.next_offset; None: no consumer applied any yet
    log_start: int
    high_watermark: int
    last_stable: int  # what a read_committed consumer can read up to
    halted: str | None = None  # why a consumer stopped it (partition_halts)
    halted_at: datetime | None = None

    @property
    def lag(self) -> int:
        """Offsets from the stored one (the log's start without one) to the last stable
        offset. Offsets, not records: a transaction marker or an aborted record the consumer
        stepped over counts too (`verify` counts records)."""
        start = self.stored if self.stored is not None else self.log_start
        return max(0, self.last_stable - start)


@dataclass(frozen=True)
class Member:
    member_id: str
    client_id: str
    host: str
    partitions: list[int]  # of the ledger's topic


@dataclass
class GroupStatus:
    group_id: str
    topic: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    state: str | None = None  # as the broker says: Stable, Empty, PreparingRebalance, Dead, ...
    members: list[Member] = field(default_factory=list)
    members_error: str | None = None  # the broker did not say: why

    @property
    def no_offsets(self) -> bool:
        return all(p.stored is None for p in self.partitions)

    @property
    def halted(self) -> list[PartitionStatus]:
        return [p for p in self.partitions if p.halted is not None]

    @property
    def ok(self) -> bool:
        return not self.no_offsets and not self.halted


async def group_status(settings: Settings) -> GroupStatus:
    group, topic = settings.group_id, settings.topic
    partitions = await topic_partitions(settings, topic, variable="LEDGER_TOPIC")
    numbers = [tp.partition for tp in partitions]
    async with database(settings) as conn:
        stored = await _stored(conn, group, topic, numbers)
        halts = await _halts(conn, group, topic, numbers)
    async with reader(settings) as consumer:  # read_committed: its end offsets are the LSOs
        starts = await consumer.beginning_offsets(partitions)
        stable = await consumer.end_offsets(partitions)
        highwater = await _high_watermarks(settings, partitions)
    status = GroupStatus(group, topic)
    for tp in partitions:
        halt = halts.get(tp.partition)
        status.partitions.append(
            PartitionStatus(
                partition=tp.partition,
                stored=stored.get(tp.partition),
                log_start=starts[tp],
                high_watermark=highwater[tp],
                last_stable=stable[tp],
                halted=halt["reason"] if halt else None,
                halted_at=halt["halted_at"] if halt else None,
            )
        )
    await _describe_members(settings, status)
    return status


async def _stored(
    conn: asyncpg.Connection, group: str, topic: str, partitions: list[int]
) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM consumer_offsets"
        " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])",
        group,
        topic,
        partitions,
    )
    return {row["partition"]: row["next_offset"] for row in rows}


async def _halts(
    conn: asyncpg.Connection, group: str, topic: str, partitions: list[int]
) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT partition, reason, halted_at FROM partition_halts"
        " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])",
        group,
        topic,
        partitions,
    )
    return {row["partition"]: row for row in rows}


async def _high_watermarks(
    settings: Settings, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """read_uncommitted end offsets: the high watermark, open transactions included."""
    from aiokafka import AIOKafkaConsumer

    from consumer.kafka.closing import stop_consumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
        **settings.kafka_security(),
    )
    try:
        await consumer.start()
        return dict(await consumer.end_offsets(partitions))
    finally:
        await stop_consumer(consumer)


async def _describe_members(settings: Settings, status: GroupStatus) -> None:
    """The group's members as the broker describes them; on any failure, why, in one field."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_security()
    )
    try:
        await admin.start()
        responses = await admin.describe_consumer_groups([status.group_id])
        groups = [g for r in responses for g in r.to_object()["groups"]]
        described = next(g for g in groups if g["group"] == status.group_id)
        if described["error_code"]:
            raise for_code(described["error_code"])(f"describing group {status.group_id}")
        status.state = described["state"]
        status.members = sorted(
            (_member(m, status.topic) for m in described["members"]), key=lambda m: m.member_id
        )
    except (KafkaError, OSError, TimeoutError, StopIteration, KeyError, ValueError) as error:
        status.members_error = f"the broker did not describe the group: {type(error).__name__}"
        log.debug("describing the group failed", exc_info=True)
    finally:
        await admin.close()


def _member(described: Mapping[str, Any], topic: str) -> Member:
    partitions: list[int] = []
    raw = described.get("member_assignment")
    if raw:  # empty while the group rebalances
        assignment = ConsumerProtocolMemberAssignment.decode(raw)
        partitions = sorted(p for t, ps in assignment.assignment if t == topic for p in ps)
    return Member(
        member_id=described["member_id"],
        client_id=described["client_id"],
        host=described["client_host"],
        partitions=partitions,
    )
