"""The arguments of consumer/ledger/arrays.py: array literals in the element forms
PostgreSQL's array input reads, lists of values for the columns sent in binary, and a clear
error for what has neither. That PostgreSQL reads them back as the rows' values is
tests/integration/test_array_arguments.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, NamedTuple

import pytest

from consumer.ledger.arrays import ArrayArguments, Column


class Row(NamedTuple):
    value: Any


def argument(kind: str, *values: Any) -> str | list[Any]:
    return ArrayArguments([Column("value", kind, "value")])([Row(v) for v in values])[0]


def literal(kind: str, *values: Any) -> str:
    written = argument(kind, *values)
    assert isinstance(written, str)
    return written


def test_elements_are_written_as_postgresql_array_input_reads_them() -> None:
    assert literal("bigint") == "{}"
    assert literal("bigint", 1, None, -(2**63)) == "{1,NULL,-9223372036854775808}"
    assert literal("text", 'say "hi"', "a\\b", None, "NULL", "") == (
        '{"say \\"hi\\"","a\\\\b",NULL,"NULL",""}'
    )


def test_uuids_bytes_and_json_text_are_lists_of_values() -> None:
    some = uuid.uuid4()
    assert argument("uuid", some, None) == [some, None]
    assert argument("bytea", b"\x00\xff", None) == [b"\x00\xff", None]
    # A jsonb value is its JSON text; None is JSON's null there, not SQL's NULL.
    assert argument("jsonb", {"k": 'v"', "n": [1, None]}, None) == [
        '{"k":"v\\"","n":[1,null]}',
        "null",
    ]


def test_a_timestamp_is_its_microseconds_since_the_epoch_whatever_its_offset() -> None:
    at = datetime(2026, 12, 7, 23, 15, 41, 123456, tzinfo=UTC)
    micros = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    east = at.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert literal("timestamptz", at, east) == f"{{{micros},{micros}}}"
    first = datetime(1, 1, 1, tzinfo=UTC)
    assert literal("timestamptz", first) == "{-62135596800000000}"


def test_a_naive_timestamp_is_refused_not_guessed() -> None:
    with pytest.raises(TypeError, match="naive"):
        literal("timestamptz", datetime(2026, 12, 7))


def test_a_value_of_another_type_is_refused() -> None:
    with pytest.raises(TypeError):
        literal("bigint", "1")
    with pytest.raises(TypeError):
        literal("text", 1)


def test_a_type_without_a_literal_is_refused_when_the_columns_are_made() -> None:
    with pytest.raises(ValueError, match="numeric"):
        ArrayArguments([Column("value", "numeric", "value")])
