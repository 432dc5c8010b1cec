"""From a usage request to one page of the billing report: the key's scope applied, the SQL
of `token-ledger usage` (consumer/commands/queries.py `usage_report`, so both give the same
answers) run in a read-only transaction under a statement timeout, and the page's cursor.

Scoping (docs/operations.md#the-usage-api): an admin key asks anything. A space key always
reads its own space: a request naming another `space_id` is NotFound, as is, for a key of one
user, another `user_id`; for a space key, a `user_id` with no usage in its space is NotFound
too, whether that user has usage elsewhere or not, so the answer never tells them apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from consumer.api.keys import KeyScope
from consumer.commands.queries import REPORTED, UsageFilter, usage_report

# The API's group names -> the report's dimensions, and the column each group answers in.
GROUP_COLUMNS = {
    "space": "space_id",
    "user": "user_id",
    "model": "model",
    "day": "day",
    "month": "month",
}
NO_USER = "(none)"  # the report's user of usage without one: null in the API
MEASURES = (*REPORTED, "usage_rows")


class NotFoundError(Exception):
    """The request names something outside the key's scope (or nothing): 404, no detail."""


class BadParameterError(Exception):
    """A parameter the route's types accept but whose meaning is wrong: 422 naming it."""

    def __init__(self, name: str, message: str, value: object) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.value = value


@dataclass(frozen=True)
class UsageQuery:
    group_by: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    space_id: int | None = None
    user_id: uuid.UUID | None = None
    model: str | None = None
    limit: int = 1000
    after: tuple[str, ...] | None = None  # the decoded cursor


def parse_group_by(values: list[str] | None) -> tuple[str, ...]:
    """`group_by=model,day`, `group_by=model&group_by=day` or both; each group once."""
    groups = [name.strip() for value in values or () for name in value.split(",")]
    for name in groups:
        if name not in GROUP_COLUMNS:
            raise BadParameterError(
                "group_by", f"{name!r} is not one of {', '.join(GROUP_COLUMNS)}", values
            )
    if len(set(groups)) != len(groups):
        raise BadParameterError("group_by", "each group at most once", values)
    return tuple(groups)


def encode_cursor(group_by: tuple[str, ...], last: tuple[str, ...]) -> str:
    text = json.dumps({"g": list(group_by), "a": list(last)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _postgres_text(value: object) -> bool:
    """Text PostgreSQL takes: no NUL; no lone surrogate (UnicodeEncodeError: no UTF-8)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    value.encode()
    return True


def decode_cursor(cursor: str, group_by: tuple[str, ...]) -> tuple[str, ...]:
    """The keyset a cursor carries; it must come from a page of the same grouping."""
    try:
        found = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = found["a"]
        ok = (
            found["g"] == list(group_by)
            and isinstance(after, list)
            and len(after) == len(group_by)
            and all(map(_postgres_text, after))
        )
    except (ValueError, TypeError, KeyError, RecursionError, binascii.Error):
        ok = False
    if not ok or not group_by:
        raise BadParameterError(
            "cursor", "not a cursor of this query: pass next_cursor as it came", cursor
        )
    return tuple(after)


async def _scoped(conn: asyncpg.Connection, scope: KeyScope, query: UsageQuery) -> UsageFilter:
    """The report's filter within the key's scope, or NotFoundError."""
    space, user = query.space_id, query.user_id
    if not scope.admin:
        if space is not None and space != scope.space_id:
            raise NotFoundError
        if scope.user_id is not None and user is not None and user != scope.user_id:
            raise NotFoundError
        if scope.user_id is None and user is not None:
            known = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM token_usage"
                " WHERE search_space_id = $1 AND user_id = $2)",
                scope.space_id,
                user,
            )
            if not known:
                raise NotFoundError
        space, user = scope.space_id, scope.user_id or user
    return UsageFilter(query.since, query.until, space, user, query.model)


async def bound_transaction(conn: asyncpg.Connection, timeout_ms: int) -> None:
    """Per request, for the current transaction only: its statement timeout, and a custom plan
    per query, so that optional filters (`$3 IS NULL OR …`) fold away and the indexes of the
    filters given are used."""
    await conn.execute(
        "SELECT set_config('statement_timeout', $1, true),"
        " set_config('plan_cache_mode', 'force_custom_plan', true)",
        f"{timeout_ms}ms",
    )


async def usage_page(
    conn: asyncpg.Connection, scope: KeyScope, query: UsageQuery, *, timeout_ms: int
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of rows (group columns, then the measures) and the next page's cursor."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await bound_transaction(conn, timeout_ms)
        only = await _scoped(conn, scope, query)
        dimensions = list(query.group_by)
        if not dimensions:
            return [_row(dimensions, row) for row in await usage_report(conn, [], only)], None
        found = await usage_report(conn, dimensions, only, after=query.after, limit=query.limit + 1)
    page = found[: query.limit]
    more = len(found) > query.limit
    next_cursor = (
        encode_cursor(query.group_by, tuple(page[-1][d] for d in dimensions)) if more else None
    )
    return [_row(dimensions, row) for row in page], next_cursor


def _row(dimensions: list[str], row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dimensions:
        value = row[name]
        if name == "space":
            value = int(value)
        elif name == "user":
            value = None if value == NO_USER else value
        out[GROUP_COLUMNS[name]] = value
    out.update({m: row[m] for m in MEASURES})
    return out
