"""`dlq replay` never takes two different source records for copies of one another: not the
records of a recreated topic at one offset, not a record whose producer set ledger.origin.*
headers itself."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka.structs import ConsumerRecord

from consumer.commands.dead_letters import one_per_origin
from consumer.kafka.dead_letters import DeadLetter, dead_letter_headers
from producer.events import RejectReason

TOPIC = "chat.turn-events"
AT = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)


def _source(offset: int, value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, b"7", value, None, 1, len(value), headers)


def _dead_letter(record: ConsumerRecord, dlq_offset: int, timestamp: int) -> ConsumerRecord:
    letter = DeadLetter(record, RejectReason.DATABASE_REJECTED, "SQLSTATE 23514")
    return ConsumerRecord(
        "dlq",
        0,
        dlq_offset,
        timestamp,
        0,
        record.key,
        record.value,
        None,
        1,
        len(record.value),
        dead_letter_headers(letter, AT, "g"),
    )


def test_a_recreated_topic_s_records_at_the_same_offset_are_both_replayed() -> None:
    # The topic's first life: offset 5 held a turn.finalized with a cost; dead-lettered.
    old = _dead_letter(_source(5, b'{"cost": "old finalize"}', []), 0, timestamp=1_000)
    # The topic was recreated; offset 5 now holds another record, dead-lettered too
    # (dead_lettered's value digest sends it, by design).
    new = _dead_letter(_source(5, b'{"cost": "new finalize"}', []), 1, timestamp=2_000)
    grouped = one_per_origin([old, new])
    replayed = sorted(record.value for record, _ in grouped.latest)
    assert replayed == [b'{"cost": "new finalize"}', b'{"cost": "old finalize"}'], (
        f"only {replayed} replayed, {grouped.copies} taken for a copy"
    )


def test_a_producer_s_origin_headers_do_not_hide_another_record() -> None:
    genuine = _dead_letter(_source(3, b'{"cost": "customer A"}', []), 0, timestamp=1_000)
    forged_headers = [
        ("ledger.origin.topic", TOPIC.encode()),
        ("ledger.origin.partition", b"0"),
        ("ledger.origin.offset", b"3"),
    ]
    forged = _dead_letter(_source(9, b'{"cost": "something else"}', forged_headers), 1, 2_000)
    grouped = one_per_origin([genuine, forged])
    replayed = sorted(record.value for record, _ in grouped.latest)
    assert b'{"cost": "customer A"}' in replayed, (
        f"only {replayed} replayed, {grouped.copies} taken for a copy"
    )
