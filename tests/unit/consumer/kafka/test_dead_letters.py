"""Dead-letter headers: the reason, the source position, the original headers, a bounded detail."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from consumer.kafka.dead_letters import (
    DETAIL_LIMIT,
    LOGGED_POSITIONS,
    ORIGIN_OFFSET,
    ORIGIN_PARTITION,
    ORIGIN_TOPIC,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    DeadLetter,
    SourcePosition,
    dead_letter_headers,
    first_position,
    log_dead_lettered,
    replay_headers,
    source_position,
)
from consumer.logs import JsonFormatter
from producer.events import RejectReason


def _record(**overrides: Any) -> ConsumerRecord:
    fields: dict[str, Any] = {
        "topic": "chat.turn-events",
        "partition": 2,
        "offset": 41,
        "timestamp": 0,
        "timestamp_type": 0,
        "key": b"42",
        "value": b"\xff raw",
        "checksum": None,
        "serialized_key_size": 2,
        "serialized_value_size": 5,
        "headers": (("trace", b"abc"), ("ledger.error.reason", b"stale")),
    }
    return ConsumerRecord(**{**fields, **overrides})


def test_dead_letter_headers() -> None:
    at = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)
    letter = DeadLetter(_record(), RejectReason.INVALID_UTF8, "é" * 2000)
    headers = dead_letter_headers(letter, at, "token-ledger")
    as_dict = dict(headers)
    assert as_dict["ledger.error.reason"] == b"invalid_utf8"
    assert as_dict["ledger.source.topic"] == b"chat.turn-events"
    assert as_dict["ledger.source.partition"] == b"2"
    assert as_dict["ledger.source.offset"] == b"41"
    assert as_dict["ledger.consumer.group"] == b"token-ledger"
    assert datetime.fromisoformat(as_dict["ledger.failed_at"].decode()) == at
    assert len(as_dict["ledger.error.detail"]) <= DETAIL_LIMIT
    as_dict["ledger.error.detail"].decode()  # cut on a character boundary
    # The original headers travel along; a stale ledger.* header from an earlier trip does not.
    assert ("trace", b"abc") in headers
    assert [v for k, v in headers if k == "ledger.error.reason"] == [b"invalid_utf8"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(SOURCE_TOPIC, b"t"), (SOURCE_PARTITION, b"1"), (SOURCE_OFFSET, b"7")], ("t", 1, 7)),
        ([(SOURCE_TOPIC, None), (SOURCE_PARTITION, b"1"), (SOURCE_OFFSET, b"7")], None),
        ([(SOURCE_TOPIC, b""), (SOURCE_PARTITION, b"1"), (SOURCE_OFFSET, b"7")], None),
        ([(SOURCE_TOPIC, b"t"), (SOURCE_PARTITION, None), (SOURCE_OFFSET, b"7")], None),
        ([("trace", None)], None),
    ],
)
def test_a_dead_letters_source_position_is_read_from_its_headers(
    headers: list[tuple[str, bytes | None]], expected: tuple[str, int, int] | None
) -> None:
    record = ConsumerRecord("dlq", 0, 0, 0, 0, None, b"x", None, 1, 0, headers)
    position = source_position(record)
    assert (
        None if position is None else (position.topic, position.partition, position.offset)
    ) == expected


REPLAYED = (
    ("trace", b"abc"),
    (ORIGIN_TOPIC, b"chat.turn-events"),
    (ORIGIN_PARTITION, b"0"),
    (ORIGIN_OFFSET, b"3"),
)


def test_a_replayed_records_dead_letter_keeps_its_origin_and_names_where_it_was_read() -> None:
    at = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)
    letter = DeadLetter(_record(headers=REPLAYED), RejectReason.INVALID_UTF8, "bad")
    headers = dead_letter_headers(letter, at, "g")
    assert [h for h in headers if h[0].startswith("ledger.origin.")] == list(REPLAYED[1:])
    assert dict(headers)[SOURCE_OFFSET] == b"41"
    dead = ConsumerRecord("dlq", 0, 9, 0, 0, b"42", b"x", None, 2, 1, headers)
    assert source_position(dead) == SourcePosition("chat.turn-events", 2, 41)
    assert first_position(dead) == SourcePosition("chat.turn-events", 0, 3)


@pytest.mark.parametrize(
    ("headers", "origin"),
    [
        # Never replayed: its origin is where it was read.
        ((("trace", b"abc"), ("ledger.consumer.group", b"g")), ("chat.turn-events", 2, 41)),
        # A copy that failed again: the first position stays, whatever this copy's.
        (REPLAYED, ("chat.turn-events", 0, 3)),
        # Origin headers that do not name a position are replaced by the source's.
        (
            (("trace", b"abc"), (ORIGIN_TOPIC, b"t"), (ORIGIN_OFFSET, b"x")),
            ("chat.turn-events", 2, 41),
        ),
    ],
)
def test_a_replayed_record_names_its_first_position_once(
    headers: tuple[tuple[str, bytes], ...], origin: tuple[str, int, int]
) -> None:
    at = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)
    letter = DeadLetter(_record(headers=headers), RejectReason.INVALID_UTF8, "bad")
    dead = ConsumerRecord(
        "dlq", 0, 9, 0, 0, b"42", b"x", None, 2, 1, dead_letter_headers(letter, at, "g")
    )
    first = first_position(dead)
    assert first is not None
    replayed = replay_headers(dead, first)
    assert replayed == [
        ("trace", b"abc"),
        (ORIGIN_TOPIC, origin[0].encode()),
        (ORIGIN_PARTITION, str(origin[1]).encode()),
        (ORIGIN_OFFSET, str(origin[2]).encode()),
    ]  # no ledger.error.*, ledger.source.*, group or failed_at: those describe a dead letter


def test_sent_dead_letters_make_one_line_per_reason_not_per_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters = [
        DeadLetter(_record(offset=offset), RejectReason.INVALID_JSON, f"bad at {offset}")
        for offset in range(100, 100 + LOGGED_POSITIONS + 5)
    ]
    letters.insert(3, DeadLetter(_record(partition=4, offset=7), RejectReason.UNKNOWN_TYPE, "x"))
    with caplog.at_level(logging.WARNING, logger="consumer.kafka.dead_letters"):
        log_dead_lettered(letters)
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert [{k: v for k, v in line.items() if k not in ("ts", "logger")} for line in lines] == [
        {
            "level": "warning",
            "msg": "dead-lettered",
            "reason": "invalid_json",
            "records": LOGGED_POSITIONS + 5,
            "positions": [f"2:{offset}" for offset in range(100, 100 + LOGGED_POSITIONS)],
            "detail": "bad at 100",
        },
        {
            "level": "warning",
            "msg": "dead-lettered",
            "reason": "unknown_type",
            "records": 1,
            "positions": ["4:7"],
            "detail": "x",
        },
    ]
