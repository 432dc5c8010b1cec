"""The devstack services are the real thing: Kafka 4.x in KRaft mode, and PostgreSQL."""

from __future__ import annotations

import uuid

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.ledger.database import asyncpg_dsn
from devstack import kafka_wire

FETCH, LEADER_AND_ISR, DESCRIBE_QUORUM, SHARE_GROUP_HEARTBEAT = 1, 4, 55, 76


def _host_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.partition(",")[0].rpartition(":")
    return host, int(port)


def test_broker_is_kafka_4_in_kraft_mode(kafka_bootstrap: str) -> None:
    versions = kafka_wire.api_versions(*_host_port(kafka_bootstrap))
    # Kafka 4.0 removed Fetch v0-3 (KIP-896) and introduced share groups (KIP-932).
    assert versions[FETCH].min_version >= 4
    assert SHARE_GROUP_HEARTBEAT in versions
    # KRaft brokers serve DescribeQuorum; ZooKeeper-era controller RPCs are gone.
    assert DESCRIBE_QUORUM in versions
    assert LEADER_AND_ISR not in versions


async def test_cluster_metadata_names_the_single_node(kafka_admin: AIOKafkaAdminClient) -> None:
    cluster = await kafka_admin.describe_cluster()
    assert [broker["node_id"] for broker in cluster["brokers"]] == [1]


async def test_group_round_trip_commits_an_offset(kafka_bootstrap: str, topic: str) -> None:
    values = [f"event-{i}".encode() for i in range(3)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"42")
    finally:
        await producer.stop()

    group = f"group-{uuid.uuid4().hex[:8]}"
    partition = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        received: list[bytes] = []
        while len(received) < len(values):
            batch = await consumer.getmany(timeout_ms=1000)
            received += [
                record.value for records in batch.values() for record in records if record.value
            ]
        await consumer.commit({partition: 3})
    finally:
        await consumer.stop()
    assert received == values

    reader = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        assert await reader.committed(partition) == 3
    finally:
        await reader.stop()


async def test_upsert_against_a_partial_unique_index(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            """
            CREATE TABLE messages (
                id bigserial PRIMARY KEY, thread_id bigint NOT NULL, turn_id text,
                role text NOT NULL, rank smallint NOT NULL, body text NOT NULL);
            CREATE UNIQUE INDEX uq_messages_turn ON messages (thread_id, turn_id, role)
                WHERE turn_id IS NOT NULL;
            """
        )
        upsert = """
            INSERT INTO messages (thread_id, turn_id, role, rank, body) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (thread_id, turn_id, role) WHERE turn_id IS NOT NULL
            DO UPDATE SET rank = EXCLUDED.rank, body = EXCLUDED.body
            WHERE messages.rank < EXCLUDED.rank
        """
        await conn.execute(upsert, 1, "1:1", "assistant", 2, "final")
        await conn.execute(upsert, 1, "1:1", "assistant", 0, "shell")  # lower rank: guarded out
        await conn.execute(upsert, 1, None, "assistant", 1, "a")  # outside the index predicate
        await conn.execute(upsert, 1, None, "assistant", 1, "b")
        rows = await conn.fetch("SELECT turn_id, rank, body FROM messages ORDER BY id")
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [("1:1", 2, "final"), (None, 1, "a"), (None, 1, "b")]
