"""The batch's rows as arguments of set-based statements: one PostgreSQL array literal a column,
written by the native path (native/src/columns.rs) from the rows' attributes in one pass.

asyncpg would encode an array argument element by element, each in its own call (two thirds of
`write_plan`'s CPU); one text a column is a copy. A statement reads the literals back with
`unnest($n::text::<type>[])`, PostgreSQL's own array input. Timestamps travel as microseconds
since the epoch (`epoch_micros` turns them back, exactly): PostgreSQL reads a number in a
fraction of the time its timestamp text takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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


def _sent_as(kind: str) -> str:
    return {"timestamptz": "bigint", "jsonb": "text"}.get(kind, kind)


class ArrayArguments:
    """A statement's columns: the arguments that carry them and the SQL that reads them."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)
        self._literals = Columns([(c.path, c.kind) for c in self.columns], canonical.utf8_text)

    def __call__(self, rows: list[Any]) -> list[str]:
        """One array literal a column, over the rows in their order."""
        return self._literals(rows)

    def unnest(self, alias: str, first: int = 1) -> str:
        """`unnest($1::text::bigint[], ...) AS alias(name, ...)`, parameters from `first` on."""
        arrays = ", ".join(
            f"${n}::text::{_sent_as(c.kind)}[]" for n, c in enumerate(self.columns, start=first)
        )
        return f"unnest({arrays}) AS {alias}({', '.join(c.name for c in self.columns)})"

    def value(self, name: str, alias: str) -> str:
        """SQL: the column `alias.name` as its own type again."""
        kind = next(c.kind for c in self.columns if c.name == name)
        if kind == "timestamptz":
            return epoch_micros(f"{alias}.{name}")
        if kind == "jsonb":
            return f"{alias}.{name}::jsonb"
        return f"{alias}.{name}"

    def values(self, alias: str, names: Sequence[str] | None = None) -> str:
        """SQL: `value` of each column named (all of them by default), comma-separated."""
        chosen = names if names is not None else [c.name for c in self.columns]
        return ", ".join(self.value(name, alias) for name in chosen)
