"""The arguments of consumer/ledger/arrays.py: array literals in the element forms
PostgreSQL's array input reads, lists of values for the columns sent in binary, and a clear
error for what has neither. That PostgreSQL reads them back as the rows' values is
tests/integration/test_array_arguments.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, NamedTuple

import asyncpg
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


class Offset(tzinfo):
    """A tzinfo whose answer datetime.utcoffset refuses (more than a day)."""

    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=30)

    def dst(self, dt: datetime | None) -> None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "+30"


@pytest.mark.parametrize(
    ("kind", "value", "cause"),
    [
        ("timestamptz", datetime(2026, 12, 7), "TypeError"),  # naive: no instant, no guess
        ("timestamptz", datetime(2026, 12, 7, tzinfo=Offset()), "ValueError"),
        ("bigint", 2**63, "OverflowError"),
        ("bigint", "1", "TypeError"),
        ("text", 1, "TypeError"),
        ("text", "\ud800", "UnicodeEncodeError"),  # not Unicode text: no UTF-8 form
    ],
)
def test_a_value_without_a_form_is_a_data_error_naming_only_its_cause(
    kind: str, value: Any, cause: str
) -> None:
    # asyncpg's DataError, as when asyncpg refused an element: the batch isolates the record
    # as poison (consumer/ledger/batch.py), and the message quotes no value.
    with pytest.raises(asyncpg.DataError) as refused:
        argument(kind, value)
    assert str(refused.value) == f"a row value has no form for its column ({cause})"


def test_a_type_without_a_literal_is_refused_when_the_columns_are_made() -> None:
    with pytest.raises(ValueError, match="numeric"):
        ArrayArguments([Column("value", "numeric", "value")])
