"""The batch's rows as arguments of set-based statements, one a column, read from the rows'
attributes in one pass by the native path (native/src/columns.rs).

asyncpg encodes an array argument element by element, each in its own call: for numbers, text
and timestamps that was most of `write_plan`'s CPU. Those columns are one PostgreSQL array
literal each, a copy for asyncpg, read back with `unnest($n::text::<type>[])` (PostgreSQL's
own array input). Timestamps travel as microseconds since the epoch (`epoch_micros` turns them
back, exactly): PostgreSQL reads a number in a fraction of the time its timestamp text takes.
UUIDs, bytes and JSON text cost PostgreSQL more to read as text than asyncpg spends on them in
binary (~0.6 µs an element against ~0.1-0.4), so they stay lists of values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg
from token_ledger_native import Columns

from producer import canonical


class Column(NamedTuple):
    name: str  # the statement's name for it
    kind: str  # its PostgreSQL type
    path: str  # the row attribute it is read from, dotted: "claim.at"


def epoch_micros(value: str) -> str:
    """SQL: the timestamptz of a microsecond count since the epoch. Whole seconds, then the
    rest: each product stays within what a double holds exactly for any year up to 9999, and a
    time-only interval moves the same instant whatever the session's time zone."""
    return (
        f"(timestamptz 'epoch' + ({value} / 1000000) * interval '1 second'"
        f" + ({value} % 1000000) * interval '1 microsecond')"
    )


# Sent as an array literal, and the element type it is read as.
_LITERAL = {"bigint": "bigint", "smallint": "smallint", "text": "text", "timestamptz": "bigint"}


def _parameter(number: int, kind: str) -> str:
    if kind in _LITERAL:
        return f"${number}::text::{_LITERAL[kind]}[]"
    return f"${number}::{'text' if kind in ('json', 'jsonb') else kind}[]"


class ArrayArguments:
    """A statement's columns: the arguments that carry them and the SQL that reads them.
    A column's type is its PostgreSQL type: bigint, smallint, text, timestamptz, uuid, bytea
    or jsonb (a value's JSON text, producer/canonical.py's, None included as `null`); or json
    for a value that is JSON text already (a str), stored as jsonb."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)
        self._arguments = Columns([(c.path, c.kind) for c in self.columns], canonical.text)

    def __call__(self, rows: list[Any]) -> list[str | list[Any]]:
        """One argument a column, over the rows in their order. A value that has no form for
        its column (a naive timestamp, an int past 64 bits, text that is not Unicode, a value
        of another type) is asyncpg's DataError, as when asyncpg encoded each element: the
        batch then isolates its record as poison rather than retrying it forever. The message
        names the error's type only: a value may be chat text."""
        try:
            return self._arguments(rows)
        except (TypeError, ValueError, OverflowError) as error:
            raise asyncpg.DataError(
                f"a row value has no form for its column ({type(error).__name__})"
            ) from None

    def unnest(self, alias: str, first: int = 1) -> str:
        """`unnest($1::text::bigint[], ...) AS alias(name, ...)`, parameters from `first` on."""
        arrays = ", ".join(_parameter(n, c.kind) for n, c in enumerate(self.columns, start=first))
        return f"unnest({arrays}) AS {alias}({', '.join(c.name for c in self.columns)})"

    def value(self, name: str, alias: str) -> str:
        """SQL: the column `alias.name` as its own type again."""
        kind = next(c.kind for c in self.columns if c.name == name)
        if kind == "timestamptz":
            return epoch_micros(f"{alias}.{name}")
        if kind in ("json", "jsonb"):
            return f"{alias}.{name}::jsonb"
        return f"{alias}.{name}"

    def values(self, alias: str, names: Sequence[str] | None = None) -> str:
        """SQL: `value` of each column named (all of them by default), comma-separated."""
        chosen = names if names is not None else [c.name for c in self.columns]
        return ", ".join(self.value(name, alias) for name in chosen)
