"""Read-side SQL for operators: the whole ledger as values (verify), the billing report
(usage), and rewinding stored offsets (replay). The hot path's SQL is in store.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from consumer.ledger.claims import MessageKey, MessageRow, ThreadRow, UsageRow
from consumer.ledger.rebuild import LedgerRows, message_values, thread_values, usage_values
from consumer.ledger.state import content_claim, source_claim, stored_key
from producer import jsonvalues
from producer.events import TOKEN_KINDS, UNATTRIBUTED, USAGE_MEASURES

THREADS = "SELECT * FROM chat_threads"
MESSAGES = "SELECT * FROM chat_messages"
USAGE = (
    "SELECT u.*, m.role, m.turn_id, m.content_event_id AS message_event_id"
    " FROM token_usage u JOIN chat_messages m ON m.id = u.message_id"
)
# Rows per round trip of ledger_by_thread's cursors: a row holds at most one event's content
# or breakdown (LEDGER_MAX_EVENT_BYTES), so the three cursors buffer at most 300 of those.
CURSOR_ROWS = 100


async def read_ledger(conn: asyncpg.Connection) -> LedgerRows:
    """Every ledger row as comparable values (see merge.LedgerRows)."""
    return _rows(await conn.fetch(THREADS), await conn.fetch(MESSAGES), await conn.fetch(USAGE))


async def ledger_by_thread(conn: asyncpg.Connection) -> AsyncIterator[tuple[int, LedgerRows]]:
    """The ledger one thread at a time, in ascending thread id, read through server-side
    cursors: memory is one thread's rows and the cursors' prefetch (CURSOR_ROWS each). Call it inside a transaction (cursors need one; a
    REPEATABLE READ one makes the three tables one snapshot)."""
    tables = [
        _ByThread(conn.cursor(THREADS + " ORDER BY id", prefetch=CURSOR_ROWS), "id"),
        _ByThread(conn.cursor(MESSAGES + " ORDER BY thread_id", prefetch=CURSOR_ROWS)),
        _ByThread(conn.cursor(USAGE + " ORDER BY u.thread_id", prefetch=CURSOR_ROWS)),
    ]
    while True:
        heads = [thread for table in tables if (thread := await table.head()) is not None]
        if not heads:
            return
        thread_id = min(heads)
        threads, messages, usage = [await table.take(thread_id) for table in tables]
        yield thread_id, _rows(threads, messages, usage)


class _ByThread:
    """A cursor's rows (ordered by thread) handed out one thread at a time."""

    def __init__(self, cursor: AsyncIterable[asyncpg.Record], column: str = "thread_id") -> None:
        self._rows = aiter(cursor)
        self._column = column
        self._next: asyncpg.Record | None = None
        self._done = False

    async def head(self) -> int | None:
        """The thread of the next row, None at the end."""
        if self._next is None and not self._done:
            try:
                self._next = await anext(self._rows)
            except StopAsyncIteration:
                self._done = True
        return None if self._next is None else self._next[self._column]

    async def take(self, thread_id: int) -> list[asyncpg.Record]:
        """The rows of `thread_id` (none if the next row is another thread's)."""
        rows = []
        while await self.head() == thread_id:
            assert self._next is not None
            rows.append(self._next)
            self._next = None
        return rows


def _rows(
    threads: Iterable[asyncpg.Record],
    messages: Iterable[asyncpg.Record],
    usage: Iterable[asyncpg.Record],
) -> LedgerRows:
    return LedgerRows(
        threads={r["id"]: thread_values(ThreadRow(**_pick(r, ThreadRow))) for r in threads},
        messages={
            stored_key(r): message_values(
                MessageRow(
                    key=stored_key(r),
                    claim=content_claim(r),
                    content=r["content"],
                    author_id=r["author_id"],
                    created_at=r["created_at"],
                )
            )
            for r in messages
        },
        usage={
            key: usage_values(
                UsageRow(
                    key=key,
                    claim=source_claim(r),
                    model_breakdown=jsonvalues.loads(r["model_breakdown"]),
                    **_pick(r, UsageRow, skip={"key", "claim", "model_breakdown"}),
                )
            )
            for r in usage
            for key in [
                MessageKey(
                    r["thread_id"],
                    r["role"],
                    r["turn_id"],
                    None if r["turn_id"] is not None else r["message_event_id"],
                )
            ]
        },
    )


def _pick(row: Mapping[str, Any], cls: type, skip: Set[str] = frozenset()) -> dict[str, Any]:
    return {f.name: row[f.name] for f in msgspec.structs.fields(cls) if f.name not in skip}


async def applied_offsets(
    conn: asyncpg.Connection, group_id: str, topic: str, partitions: Iterable[int]
) -> dict[int, int]:
    """Per partition, the end of what the ledger holds: the furthest next_offset ever
    committed (after a `replay` the ledger still holds the records past next_offset)."""
    rows = await conn.fetch(
        "SELECT partition, greatest(next_offset, applied_until) AS applied"
        " FROM consumer_offsets"
        " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])",
        group_id,
        topic,
        sorted(partitions),
    )
    return {row["partition"]: row["applied"] for row in rows}


# -- replay: rewind stored offsets -----------------------------------------------------------


async def rewind_offsets(
    conn: asyncpg.Connection,
    group_id: str,
    topic: str,
    targets: Mapping[int, int],
    *,
    dry_run: bool = False,
) -> dict[int, tuple[int, int]]:
    """Move stored next_offsets back to `targets` (never forward); partition -> (old, new).
    With dry_run, only say so.

    A running consumer notices at its next batch (its compare-and-set fails) or within a few
    seconds when idle, and seeks to the rewound offsets.
    """
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT partition, next_offset FROM consumer_offsets"
            " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])"
            " ORDER BY partition FOR UPDATE",
            group_id,
            topic,
            sorted(targets),
        )
        moves = {
            r["partition"]: (r["next_offset"], min(r["next_offset"], targets[r["partition"]]))
            for r in rows
        }
        changed = sorted(p for p, (old, new) in moves.items() if new < old)
        if dry_run:
            return moves
        await conn.execute(
            # Where the ledger stands is kept whoever wrote the offsets (an older release
            # does not keep applied_until): a rewind is where the two part.
            "UPDATE consumer_offsets AS o SET next_offset = v.next_offset, updated_at = now(),"
            " applied_until = greatest(o.applied_until, o.next_offset)"
            " FROM unnest($3::int[], $4::bigint[]) AS v(partition, next_offset)"
            " WHERE o.group_id = $1 AND o.topic = $2 AND o.partition = v.partition",
            group_id,
            topic,
            changed,
            [moves[p][1] for p in changed],
        )
    return moves


# -- usage: the billing report ---------------------------------------------------------------

# Whitelisted dimensions: name -> SQL expression (never built from user input).
USAGE_DIMENSIONS = {
    "user": "coalesce(u.user_id::text, '(none)')",
    "space": "u.search_space_id::text",
    "model": "u.model",
    # A usage row's period is its winning event's occurred_at (source_at), which moves only
    # with a revision: the billing stream's `time` (docs/contract.md#billing-attribution).
    "day": "to_char(u.source_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "month": "to_char(u.source_at AT TIME ZONE 'UTC', 'YYYY-MM')",
}
REPORTED = (*USAGE_MEASURES, *TOKEN_KINDS)
# Every column of token_usage the report reads, named (never `u.*`): the usage API's role may
# read these and no other (migrations/versions/0008), call_details least of all.
REPORT_COLUMNS = (
    "id",
    "user_id",
    "search_space_id",
    "source_at",
    "model_breakdown",
    *USAGE_MEASURES,
)


def _share(measure: str) -> str:
    # A legacy breakdown entry may lack a measure (or hold null): it covers none of it.
    return f"coalesce((b.value->>'{measure}')::bigint, 0)"


def _kind(kind: str) -> str:
    # Token kinds are counted where a breakdown entry reports them as a JSON number (a legacy
    # entry is kept as sent, so anything else may be there: it counts as not reported).
    value = f"b.value->'{kind}'"
    return f"CASE WHEN jsonb_typeof({value}) = 'number' THEN ({value})::numeric ELSE 0 END"


# One row per (usage row, model) by merge.attribution: the breakdown's numbers, and what they
# leave of the row's totals under '(unattributed)', so the models of a row sum to its totals.
# Token kinds exist only per model: the unattributed share has none.
_BY_MODEL = f"""(
  SELECT u.id, u.user_id, u.search_space_id, u.source_at, b.key AS model,
         {", ".join(f"{_share(m)} AS {m}" for m in USAGE_MEASURES)},
         {", ".join(f"{_kind(k)} AS {k}" for k in TOKEN_KINDS)}
  FROM token_usage AS u CROSS JOIN LATERAL jsonb_each(u.model_breakdown) AS b
  UNION ALL
  SELECT u.id, u.user_id, u.search_space_id, u.source_at, '{UNATTRIBUTED}',
         {", ".join(f"u.{m} - c.{m}" for m in USAGE_MEASURES)},
         {", ".join(f"0 AS {k}" for k in TOKEN_KINDS)}
  FROM token_usage AS u CROSS JOIN LATERAL (
    SELECT {", ".join(f"coalesce(sum({_share(m)}), 0) AS {m}" for m in USAGE_MEASURES)}
    FROM jsonb_each(u.model_breakdown) AS b
  ) AS c
  WHERE {" OR ".join(f"u.{m} <> c.{m}" for m in USAGE_MEASURES)}
)"""

# One row per usage row, with its token kinds summed over its breakdown.
_BY_ROW = f"""(
  SELECT {", ".join(f"u.{c}" for c in REPORT_COLUMNS if c != "model_breakdown")},
         {", ".join(f"k.{kind}" for kind in TOKEN_KINDS)}
  FROM token_usage AS u CROSS JOIN LATERAL (
    SELECT {", ".join(f"coalesce(sum({_kind(k)}), 0) AS {k}" for k in TOKEN_KINDS)}
    FROM jsonb_each(u.model_breakdown) AS b
  ) AS k
)"""


@dataclass(frozen=True)
class UsageFilter:
    """Which usage the report counts: one search space, user or model, within [since, until)."""

    since: datetime | None = None
    until: datetime | None = None
    space: int | None = None
    user: uuid.UUID | None = None
    model: str | None = None


async def usage_report(
    conn: asyncpg.Connection,
    group_by: list[str],
    only: UsageFilter = UsageFilter(),
    *,
    after: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Token and cost sums of the ledger grouped by the chosen dimensions (UTC days), with the
    token kinds of the breakdowns; by model, each row is split by merge.attribution, so the
    groups always sum to the ungrouped totals. An empty group_by: one row, the totals.

    Groups come in the order of their dimensions' values (as text). One page of them: `limit`
    groups, and `after` (the dimensions' values of the previous page's last group) for the
    next page, a keyset the usage API (consumer/api/) hands out as its cursor."""
    unknown = [d for d in group_by if d not in USAGE_DIMENSIONS]
    if unknown:
        raise ValueError(f"group by one or more of {', '.join(USAGE_DIMENSIONS)}: got {unknown}")
    by_model = "model" in group_by or only.model is not None
    source = _BY_MODEL if by_model else _BY_ROW
    # coalesce: the total of nothing (an empty ledger, a filter matching no row) is 0.
    measures = ", ".join(f"coalesce(sum(u.{m}), 0) AS {m}" for m in REPORTED)
    # Quoted: a bare `user` in GROUP BY is PostgreSQL's CURRENT_USER, not the column alias.
    aliases = ", ".join(f'"{d}"' for d in group_by)
    dimensions = "".join(f'{USAGE_DIMENSIONS[d]} AS "{d}", ' for d in group_by)
    ordered = f" ORDER BY {aliases}" if group_by else ""
    query = (
        f"SELECT {dimensions}{measures}, count(DISTINCT u.id) AS usage_rows"
        f" FROM {source} AS u"
        " WHERE ($1::timestamptz IS NULL OR u.source_at >= $1)"
        "   AND ($2::timestamptz IS NULL OR u.source_at < $2)"
        "   AND ($3::bigint IS NULL OR u.search_space_id = $3)"
        "   AND ($4::uuid IS NULL OR u.user_id = $4)"
        + ("   AND ($5::text IS NULL OR u.model = $5)" if by_model else "")
        + (f" GROUP BY {aliases}" if group_by else "")
    )
    args: list[Any] = [only.since, only.until, only.space, only.user]
    args += [only.model] if by_model else []
    if after is not None or limit is not None:
        keyset = ""
        if after is not None:
            if len(after) != len(group_by):
                raise ValueError(f"a page follows a group of {len(group_by)} value(s)")
            # Every dimension is text and never null, so the row comparison is the ORDER BY's.
            first = len(args) + 1
            values = ", ".join(f"${first + i}::text" for i in range(len(after)))
            keyset = f" WHERE ({aliases}) > ({values})"
            args += after
        args.append(limit)
        query = f"SELECT * FROM ({query}) AS g{keyset}{ordered} LIMIT ${len(args)}"
    else:
        query += ordered
    rows = await conn.fetch(query, *args)
    return [{k: _exact(v) if isinstance(v, Decimal) else v for k, v in row.items()} for row in rows]


def _exact(total: Decimal) -> int | Decimal:
    """A sum as a Python int when it is whole (sum(bigint) is numeric in PostgreSQL), else as
    the exact Decimal: a legacy breakdown's token kind is kept as sent, fractions included, and
    a ledger written before numbers were bounded may sum past what Python prints as an int."""
    if total == total.to_integral_value() and total.adjusted() < _INT_PRINT_DIGITS:
        return int(total)
    return total


_INT_PRINT_DIGITS = 4000  # below Python's default limit for str(int) (4,300 digits)
