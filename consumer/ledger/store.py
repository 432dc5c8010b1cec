"""The batch's writes: guarded upserts, set-based (UNNEST over arrays), so a batch costs the
same handful of round trips whatever its size:

    write_plan  <= 7 statements  threads, turn messages, turn-less messages (+ a check that no
                                 other writer keyed another message by the same event_id), the
                                 usage's spaces and their budgets locked, token usage; keys
                                 sorted to avoid deadlocks

Every upsert repeats its partial index predicate in the conflict target and carries a guard
(`DO UPDATE ... WHERE new claim beats stored claim`) so stored rows only move forward under the
merge rules, whatever a concurrent writer did since `load_state` (state.py) read them. The
offsets are offsets.py, and the whole transaction, numbered, is batch.py. The caller owns the
transaction: rows and offsets commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

import asyncpg

from consumer.errors import ConcurrentWriteError, ThreadRaceError
from consumer.ledger.claims import BatchPlan, UsageRow
from producer import canonical
from producer.events import USAGE_MEASURES


def canonical_json(value: Any) -> str:
    """The JSON text written to jsonb columns (compact, unicode and exact numbers kept)."""
    return canonical.text(value)


def _take_if(condition: str, alias: str, columns: Iterable[str]) -> str:
    """`col = CASE WHEN <new claim wins> THEN EXCLUDED.col ELSE <stored>.col END, ...`"""
    return ",\n  ".join(
        f"{c} = CASE WHEN {condition} THEN EXCLUDED.{c} ELSE {alias}.{c} END" for c in columns
    )


_CREATOR_WINS = """(EXCLUDED.created_by_at IS NOT NULL AND (t.created_by_at IS NULL
    OR (EXCLUDED.created_by_at, EXCLUDED.created_by_event_id, EXCLUDED.created_by_digest)
       < (t.created_by_at, t.created_by_event_id, t.created_by_digest)))"""

_CREATOR_COLUMNS = ("created_by_id", "created_by_at", "created_by_event_id", "created_by_digest")

_UPSERT_THREADS = f"""
INSERT INTO chat_threads AS t (id, search_space_id, created_at, updated_at, created_by_id,
                               created_by_at, created_by_event_id, created_by_digest)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::timestamptz[],
                     $5::uuid[], $6::timestamptz[], $7::uuid[], $8::bytea[])
ON CONFLICT (id) DO UPDATE SET
  created_at = LEAST(t.created_at, EXCLUDED.created_at),
  updated_at = GREATEST(t.updated_at, EXCLUDED.updated_at),
  {_take_if(_CREATOR_WINS, "t", _CREATOR_COLUMNS)}
WHERE t.search_space_id = EXCLUDED.search_space_id
RETURNING id
"""

_CONTENT_WINS = """((EXCLUDED.content_rank, EXCLUDED.content_at, EXCLUDED.content_event_id,
     EXCLUDED.content_digest)
    > (m.content_rank, m.content_at, m.content_event_id, m.content_digest))"""

_MESSAGE_VALUES = """
SELECT v.thread_id, v.role, v.turn_id, v.content::jsonb, v.author_id, v.content_rank,
       v.content_at, v.content_event_id, v.content_digest, v.created_at, now()
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::smallint[],
            $7::timestamptz[], $8::uuid[], $9::bytea[], $10::timestamptz[])
  AS v(thread_id, role, turn_id, content, author_id, content_rank, content_at,
       content_event_id, content_digest, created_at)
"""

_MESSAGE_COLUMNS = """chat_messages AS m (thread_id, role, turn_id, content, author_id,
  content_rank, content_at, content_event_id, content_digest, created_at, updated_at)"""

_CONTENT_COLUMNS = (
    "content",
    "author_id",
    "content_rank",
    "content_at",
    "content_event_id",
    "content_digest",
)

_UPSERT_TURN_MESSAGES = f"""
INSERT INTO {_MESSAGE_COLUMNS}
{_MESSAGE_VALUES}
ON CONFLICT (thread_id, turn_id, role) WHERE turn_id IS NOT NULL DO UPDATE SET
  {_take_if(_CONTENT_WINS, "m", _CONTENT_COLUMNS)},
  created_at = LEAST(m.created_at, EXCLUDED.created_at),
  updated_at = now()
WHERE {_CONTENT_WINS} OR EXCLUDED.created_at < m.created_at
"""

# A message without turn_id is keyed by the event that created it; copies of that event (same
# thread and role) compete for its content like any register. A row of the same event_id in
# another thread or role is never touched: see _TURNLESS_CONFLICTS.
_UPSERT_TURNLESS_MESSAGES = f"""
INSERT INTO {_MESSAGE_COLUMNS}
{_MESSAGE_VALUES}
ON CONFLICT (content_event_id) WHERE turn_id IS NULL DO UPDATE SET
  {_take_if(_CONTENT_WINS, "m", _CONTENT_COLUMNS)},
  created_at = LEAST(m.created_at, EXCLUDED.created_at),
  updated_at = now()
WHERE m.thread_id = EXCLUDED.thread_id AND m.role = EXCLUDED.role
  AND ({_CONTENT_WINS} OR EXCLUDED.created_at < m.created_at)
"""

# load_state saw no such row, so another writer (another partition's consumer) created it
# since: the batch is retried, and the retry rejects the event as event_id_conflict.
_TURNLESS_CONFLICTS = """
SELECT count(*) FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS k(event_id, thread_id, role)
JOIN chat_messages AS m ON m.turn_id IS NULL AND m.content_event_id = k.event_id
WHERE m.thread_id <> k.thread_id OR m.role <> k.role
"""

_USAGE_WINS = """(EXCLUDED.source_rank > u.source_rank
    OR (EXCLUDED.source_rank = u.source_rank
        AND (EXCLUDED.source_at, EXCLUDED.source_event_id, EXCLUDED.source_digest)
            < (u.source_at, u.source_event_id, u.source_digest)))"""

# The usage row as the batch writes it, in one place: each column, its PostgreSQL type and its
# value (json as text, cast on the way in). The statement below, its parameters and its
# conflict update are built from this; tests/integration/test_migrations.py checks the columns
# and types against the migrated table, the only source of schema.
USAGE_WRITTEN: tuple[tuple[str, str, Callable[[UsageRow], object]], ...] = (
    *((measure, "bigint", attrgetter(measure)) for measure in USAGE_MEASURES),
    ("model_breakdown", "jsonb", lambda r: canonical_json(r.model_breakdown)),
    ("call_details", "jsonb", lambda r: canonical_json(r.call_details)),
    ("search_space_id", "bigint", attrgetter("search_space_id")),
    ("user_id", "uuid", attrgetter("user_id")),
    ("source", "text", attrgetter("source")),
    ("source_rank", "smallint", attrgetter("claim.rank")),
    ("source_at", "timestamptz", attrgetter("claim.at")),
    ("source_event_id", "uuid", attrgetter("claim.event_id")),
    ("source_digest", "bytea", attrgetter("claim.digest")),
    ("created_at", "timestamptz", attrgetter("created_at")),
)
# What finds the usage row's message (thread, role, and turn or creating event): looked up, not
# written.
_USAGE_KEY = (
    ("thread_id", "bigint"),
    ("role", "text"),
    ("turn_id", "text"),
    ("origin_event_id", "uuid"),
)
_USAGE_INPUTS = [*_USAGE_KEY, *((name, kind) for name, kind, _ in USAGE_WRITTEN)]
# A new winning claim takes every written column but created_at (the earliest stays).
_USAGE_TAKEN = [name for name, _, _ in USAGE_WRITTEN if name != "created_at"]


def _cast(name: str, kind: str) -> str:
    return f"j.{name}::jsonb" if kind == "jsonb" else f"j.{name}"


_UPSERT_USAGE = f"""
WITH v AS (
  SELECT * FROM unnest({
    ", ".join(
        f"${n}::{'text' if kind == 'jsonb' else kind}[]"
        for n, (_, kind) in enumerate(_USAGE_INPUTS, start=1)
    )
})
    AS v({", ".join(name for name, _ in _USAGE_INPUTS)})
), joined AS (
  -- One probe of the unique index that keys the message (an OR of both keys in one join
  -- condition could use neither, and read every message of the thread instead).
  SELECT v.*, CASE WHEN v.turn_id IS NOT NULL THEN (
      SELECT m.id FROM chat_messages AS m
      WHERE m.thread_id = v.thread_id AND m.turn_id = v.turn_id AND m.role = v.role)
    ELSE (
      SELECT m.id FROM chat_messages AS m
      WHERE m.turn_id IS NULL AND m.content_event_id = v.origin_event_id
        AND m.thread_id = v.thread_id AND m.role = v.role)
    END AS message_id
  FROM v
), written AS (
  INSERT INTO token_usage AS u (usage_type, thread_id, message_id, updated_at,
    {", ".join(name for name, _, _ in USAGE_WRITTEN)})
  SELECT 'chat', j.thread_id, j.message_id, now(),
    {", ".join(_cast(name, kind) for name, kind, _ in USAGE_WRITTEN)}
  FROM joined AS j WHERE j.message_id IS NOT NULL
  ORDER BY j.message_id
  ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO UPDATE SET
    {_take_if(_USAGE_WINS, "u", _USAGE_TAKEN)},
    created_at = LEAST(u.created_at, EXCLUDED.created_at),
    updated_at = now()
  WHERE {_USAGE_WINS} OR EXCLUDED.created_at < u.created_at
  RETURNING 1
)
SELECT count(*) FILTER (WHERE message_id IS NULL) AS orphans FROM joined
"""


# Before the usage upsert: a shared lock per space whose usage the batch writes (`budget set`
# takes it exclusively, so a budget created meanwhile is judged with this batch's usage, by
# whichever commits second), then, in id order, the budgets its usage rows fall under (their
# space's, and their users'). The upsert's statement triggers (migrations/versions/0010 and
# 0012) lock the budgets they touch in two rounds, AFTER UPDATE then AFTER INSERT;
# taken here in one round first, two members never take them in opposite rounds. (A row that
# a supersession moves from another user also touches that user's budget, locked by the
# trigger: a deadlock there, rare, is broken by PostgreSQL and the batch retried.) The space
# locks are keyed by the negated id: the bigint key space, apart from the relay's positive
# constant and the threads' two-int keys.
_LOCK_SPACES = """
SELECT count(pg_advisory_xact_lock_shared(-s))
FROM (SELECT s FROM unnest($1::bigint[]) AS s ORDER BY s) AS k
"""
_LOCK_BUDGETS = """
SELECT count(*) FROM (
  SELECT FROM budgets WHERE id IN (
    -- Two probes of the partial unique indexes (an OR of both could use neither).
    SELECT id FROM budgets WHERE user_id IS NULL AND search_space_id = ANY($1::bigint[])
    UNION
    SELECT b.id FROM unnest($1::bigint[], $2::uuid[]) AS k(space, user_id)
    JOIN budgets AS b ON b.search_space_id = k.space AND b.user_id = k.user_id)
  ORDER BY id FOR UPDATE
) AS l
"""


async def write_plan(conn: asyncpg.Connection, plan: BatchPlan) -> None:
    if plan.threads:
        t = plan.threads
        written = await conn.fetch(
            _UPSERT_THREADS,
            [r.id for r in t],
            [r.search_space_id for r in t],
            [r.created_at for r in t],
            [r.updated_at for r in t],
            [r.created_by_id for r in t],
            [r.created_by_at for r in t],
            [r.created_by_event_id for r in t],
            [r.created_by_digest for r in t],
        )
        if len(written) != len(t):
            # Created by a concurrent writer with another search space after load_state read
            # it; the retry will see it and reject the events that name the wrong space.
            raise ThreadRaceError("a thread was created concurrently with another search space")
    turn_rows = [r for r in plan.messages if r.key.turn_id is not None]
    turnless_rows = [r for r in plan.messages if r.key.turn_id is None]
    for statement, rows in (
        (_UPSERT_TURN_MESSAGES, turn_rows),
        (_UPSERT_TURNLESS_MESSAGES, turnless_rows),
    ):
        if rows:
            # One tuple per row, then columns (zip in C): one pass over the rows.
            await conn.execute(
                statement,
                *zip(
                    *(
                        (
                            r.key.thread_id,
                            r.key.role,
                            r.key.turn_id,
                            canonical_json(r.content),
                            r.author_id,
                            r.claim.rank,
                            r.claim.at,
                            r.claim.event_id,
                            r.claim.digest,
                            r.created_at,
                        )
                        for r in rows
                    ),
                    strict=True,
                ),
            )
    if turnless_rows and await conn.fetchval(
        _TURNLESS_CONFLICTS,
        [r.key.origin_event_id for r in turnless_rows],
        [r.key.thread_id for r in turnless_rows],
        [r.key.role for r in turnless_rows],
    ):
        raise ConcurrentWriteError("another writer keyed a turn-less message by the same event_id")
    if plan.usage:
        u = plan.usage
        await conn.fetchval(_LOCK_SPACES, sorted({r.search_space_id for r in u}))
        scopes = sorted({(r.search_space_id, r.user_id) for r in u}, key=str)
        await conn.fetchval(_LOCK_BUDGETS, [s for s, _ in scopes], [user for _, user in scopes])
        orphans = await conn.fetchval(
            _UPSERT_USAGE,
            [r.key.thread_id for r in u],
            [r.key.role for r in u],
            [r.key.turn_id for r in u],
            [r.key.origin_event_id for r in u],
            *([value(r) for r in u] for _, _, value in USAGE_WRITTEN),
        )
        if orphans:
            # The message rows were written above in this transaction, so only a concurrent
            # writer can have taken the key; the retry sees its row and decides again.
            raise ConcurrentWriteError(f"{orphans} usage rows found no message row to attach to")
