"""consumer/ledger/arrays.py against the real database: whatever rows hold, the array literals
the native path writes read back in PostgreSQL as the rows' own values, and a jsonb column's
text is byte for byte producer/canonical.py's."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, NamedTuple

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.ledger.arrays import ArrayArguments, Column
from consumer.ledger.database import asyncpg_dsn
from producer import canonical


class Key(NamedTuple):
    name: str | None


class Row(NamedTuple):
    number: int | None
    small: int | None
    key: Key
    id: uuid.UUID | None
    at: datetime | None
    digest: bytes | None
    document: Any


ARGUMENTS = ArrayArguments(
    [
        Column("number", "bigint", "number"),
        Column("small", "smallint", "small"),
        Column("name", "text", "key.name"),
        Column("id", "uuid", "id"),
        Column("at", "timestamptz", "at"),
        Column("digest", "bytea", "digest"),
        Column("document", "jsonb", "document"),
    ]
)
# The values as PostgreSQL has them, then the jsonb column's text as sent.
READ_BACK = f"""
SELECT {ARGUMENTS.values("v")}::text, v.document
FROM {ARGUMENTS.unnest("v")}
"""

# PostgreSQL's text and jsonb hold no NUL, UTF-8 no lone surrogate; anything else may come.
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
).map(timezone)
rows = st.builds(
    Row,
    number=st.none() | st.integers(-(2**63), 2**63 - 1),
    small=st.none() | st.integers(-(2**15), 2**15 - 1),
    key=st.builds(
        Key, st.none() | texts | st.sampled_from(["NULL", "", '"', "\\", "{a,b}", " x "])
    ),
    id=st.none() | st.uuids(),
    # A day inside Python's range on either side, whatever the offset.
    at=st.none()
    | st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets
    ),
    digest=st.none() | st.binary(max_size=40),
    document=json_values,
)


class Reader:
    """One event loop and connection for all examples (hypothesis tests are synchronous)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(asyncpg_dsn(url))
        )

    def read(self, written: list[Row]) -> list[asyncpg.Record]:
        return self.loop.run_until_complete(self.conn.fetch(READ_BACK, *ARGUMENTS(written)))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def test_array_literals_read_back_as_the_rows_values(database_url: str) -> None:
    reader = Reader(database_url)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(rows, max_size=6))
    def check(written: list[Row]) -> None:
        read = reader.read(written)
        assert len(read) == len(written)
        for row, record in zip(written, read, strict=True):
            number, small, name, id_, at, digest, document, sent = record
            assert (number, small, name, id_, digest) == (
                row.number,
                row.small,
                row.key.name,
                row.id,
                row.digest,
            )
            # The same instant, whatever offset it was written with.
            assert at == (None if row.at is None else row.at.astimezone(UTC))
            assert sent == canonical.text(row.document)
            assert document == canonical_jsonb(reader, sent)

    try:
        check()
    finally:
        reader.close()


def canonical_jsonb(reader: Reader, text: str) -> str:
    """The jsonb PostgreSQL makes of a text when it is a single parameter, not an element."""
    return str(reader.loop.run_until_complete(reader.conn.fetchval("SELECT $1::jsonb::text", text)))
