"""Dead letters go out in batches per partition (producer/batches.py): a letter the
dead-letter topic refuses stops its own source partition only, never another whose letter
shared its batch and that the topic takes alone."""

from __future__ import annotations

import random
import uuid

import pytest
from aiokafka.structs import ConsumerRecord

from consumer.errors import DeadLetterRefusedError
from consumer.kafka.dead_letters import DeadLetter, DeadLetterQueue
from producer.client import ensure_topic
from producer.events import RejectReason


def _letter(partition: int, value: bytes) -> DeadLetter:
    record = ConsumerRecord(
        "chat.turn-events", partition, 7, 0, 0, b"1", value, None, 1, len(value), []
    )
    return DeadLetter(record, RejectReason.INVALID_UTF8, "invalid byte at 0")


async def test_a_refused_letter_stops_its_own_partition_only(kafka_bootstrap: str) -> None:
    topic = f"dlq-limits-{uuid.uuid4().hex[:8]}"
    await ensure_topic(kafka_bootstrap, topic, partitions=1, config={"max.message.bytes": "2000"})
    incompressible = random.Random(1).randbytes(100_000)
    big, small = _letter(0, b"\xff" + incompressible), _letter(1, b"\xff{}")
    async with DeadLetterQueue(kafka_bootstrap, topic, group_id="g") as dlq:
        with pytest.raises(DeadLetterRefusedError) as refused:
            await dlq.report([big, small])
    assert refused.value.partitions == [0]


async def test_letters_the_topic_takes_one_by_one_are_taken_together(kafka_bootstrap: str) -> None:
    topic = f"dlq-limits-{uuid.uuid4().hex[:8]}"
    await ensure_topic(kafka_bootstrap, topic, partitions=1, config={"max.message.bytes": "50000"})
    letters = [
        _letter(partition, b"\xff" + random.Random(partition).randbytes(30_000))
        for partition in (0, 1)
    ]
    async with DeadLetterQueue(kafka_bootstrap, topic, group_id="g") as dlq:
        await dlq.report(letters)  # each fits the topic, together they would not
