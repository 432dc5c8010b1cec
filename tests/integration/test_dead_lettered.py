"""`dead_lettered`: a group sends a dead letter once per source position, unless the position now
holds another record (a recreated topic); another group sends its own."""

from __future__ import annotations

import asyncpg
from aiokafka.structs import ConsumerRecord

from consumer.kafka.dead_letters import DeadLetter
from consumer.ledger.dead_lettered import record_dead_letters
from producer.events import RejectReason


def _letter(offset: int, value: bytes = b"{not json", partition: int = 0) -> DeadLetter:
    record = ConsumerRecord("t", partition, offset, 0, 0, b"k", value, None, 1, len(value), [])
    return DeadLetter(record, RejectReason.INVALID_JSON, "bad")


async def _record(
    conn: asyncpg.Connection, group: str, letters: list[DeadLetter]
) -> list[tuple[int, int]]:
    async with conn.transaction():
        sent = await record_dead_letters(conn, group, letters)
    return [(x.record.partition, x.record.offset) for x in sent]


async def test_a_position_is_sent_once_per_group_and_value(ledger: asyncpg.Connection) -> None:
    first = [_letter(5, partition=1), _letter(3), _letter(7)]
    assert await _record(ledger, "g", first) == [(1, 5), (0, 3), (0, 7)]  # in the given order
    assert await _record(ledger, "g", first) == []
    assert await _record(ledger, "g", [_letter(3), _letter(4)]) == [(0, 4)]
    # The same offset holding another record (the topic recreated): sent, and taken over.
    assert await _record(ledger, "g", [_letter(7, b"\xff"), _letter(3)]) == [(0, 7)]
    assert await _record(ledger, "g", [_letter(7, b"\xff")]) == []
    assert await _record(ledger, "other", first) == [(1, 5), (0, 3), (0, 7)]


async def test_nothing_is_recorded_when_the_transaction_rolls_back(
    ledger: asyncpg.Connection,
) -> None:
    try:
        async with ledger.transaction():
            assert len(await record_dead_letters(ledger, "g", [_letter(1)])) == 1
            raise RuntimeError("the dead-letter topic did not acknowledge")
    except RuntimeError:
        pass
    assert await _record(ledger, "g", [_letter(1)]) == [(0, 1)]
