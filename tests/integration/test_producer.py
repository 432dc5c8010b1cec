"""Events published by TurnEventProducer, read back from the real broker by another client
(librdkafka through confluent-kafka), decode to equal events and are keyed by thread_id."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

from confluent_kafka import Consumer

from producer.client import TurnEventProducer, UsageAccumulator, ensure_topic
from producer.decoding import decode_event
from producer.events import LegacyTokenUsage, MessageAppended, Rejection, TurnFinalized, TurnStarted


def _read_all(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes, int]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[tuple[bytes, bytes, int]] = []
    try:
        for _ in range(60):
            for message in consumer.consume(num_messages=count, timeout=1.0):
                assert message.error() is None, message.error()
                key, value = message.key(), message.value()
                assert key is not None and value is not None
                records.append((key, value, message.timestamp()[1]))
            if len(records) >= count:
                break
    finally:
        consumer.close()
    return records


async def test_published_events_read_back_by_librdkafka(kafka_bootstrap: str, topic: str) -> None:
    user = uuid.uuid4()
    at = datetime(2026, 11, 26, 9, 15, 2, 118000, tzinfo=UTC)
    usage = UsageAccumulator()
    usage.add("gpt-4o-mini", 100, 50, 150, 12345)
    usage.add("text-embedding-3-small", 40, 0, 40, 1, call_kind="embedding")
    async with TurnEventProducer(kafka_bootstrap, topic=topic) as producer:
        ids = [
            await producer.turn_started(
                thread_id=4242,
                search_space_id=7,
                user_id=user,
                turn_id="4242:1",
                user_query="Summarise the Q3 report 🚀",
                occurred_at=at,
                mentioned_documents=[{"id": 11, "title": "Q3", "document_type": "FILE"}],
            ),
            await producer.turn_finalized(
                thread_id=4242,
                search_space_id=7,
                user_id=user,
                turn_id="4242:1",
                content=[
                    {"type": "text", "text": "Revenue grew 12%"},
                    {"type": "tool-call", "toolName": "search", "args": {"q": "Q3"}},
                ],
                usage=usage,
                occurred_at=at,
            ),
            await producer.message_appended(
                thread_id=99,
                search_space_id=7,
                user_id=user,
                role="assistant",
                content=[{"type": "text", "text": "legacy"}],
                occurred_at=at,
                token_usage=LegacyTokenUsage(
                    prompt_tokens=1, completion_tokens=2, total_tokens=3, cost_micros=4
                ),
            ),
        ]

    records = await asyncio.to_thread(_read_all, kafka_bootstrap, topic, 3)
    assert len(records) == 3
    decoded = [decode_event(value, timestamp_ms=ts) for _, value, ts in records]
    assert [e.event_id for e in decoded if not isinstance(e, Rejection)] == ids
    started, finalized, appended = decoded
    assert isinstance(started, TurnStarted) and started.user_query == "Summarise the Q3 report 🚀"
    assert started.occurred_at == at and started.user_id == user
    assert isinstance(finalized, TurnFinalized) and finalized.usage is not None
    assert [c.cost_micros for c in finalized.usage.calls] == [12345, 1]
    assert finalized.content[1].model_dump() == {
        "type": "tool-call",
        "toolName": "search",
        "args": {"q": "Q3"},
    }
    assert isinstance(appended, MessageAppended) and appended.token_usage is not None
    assert [key for key, _, _ in records] == [b"4242", b"4242", b"99"]


async def test_ensure_topic_creates_once_and_keeps_existing(kafka_bootstrap: str) -> None:
    name = f"test.ensure.{uuid.uuid4().hex[:8]}"
    await ensure_topic(kafka_bootstrap, name, partitions=3)
    await ensure_topic(kafka_bootstrap, name, partitions=5)  # exists: left as it is
    records = await asyncio.to_thread(_partition_count, kafka_bootstrap, name)
    assert records == 3


def _partition_count(bootstrap: str, topic: str) -> int:
    """The topic's partitions once the broker's metadata names any (a topic created a moment
    ago can briefly be listed with none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "meta"})
    try:
        deadline = time.monotonic() + 30
        while True:
            count = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
            if count or time.monotonic() > deadline:
                return count
            time.sleep(0.1)  # polling the broker's metadata, in a worker thread
    finally:
        consumer.close()
