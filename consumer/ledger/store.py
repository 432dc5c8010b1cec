"""The batch's writes: guarded upserts, set-based (UNNEST over arrays, each sent as one literal
written natively: arrays.py), so a batch costs the same handful of round trips whatever its
size:

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

from collections.abc import Iterable

import asyncpg

from consumer.errors import ConcurrentWriteError, ThreadRaceError
from consumer.ledger.arrays import ArrayArguments, Column
from consumer.ledger.claims import BatchPlan
from producer.events import USAGE_MEASURES


def _take_if(condition: str, alias: str, columns: Iterable[str]) -> str:
    """`col = CASE WHEN <new claim wins> THEN EXCLUDED.col ELSE <stored>.col END, ...`"""
    return ",\n  ".join(
        f"{c} = CASE WHEN {condition} THEN EXCLUDED.{c} ELSE {alias}.{c} END" for c in columns
    )


_CREATOR_WINS = """(EXCLUDED.created_by_at IS NOT NULL AND (t.created_by_at IS NULL
    OR (EXCLUDED.created_by_at, EXCLUDED.created_by_event_id, EXCLUDED.created_by_digest)
       < (t.created_by_at, t.created_by_event_id, t.created_by_digest)))"""

_CREATOR_COLUMNS = ("created_by_id", "created_by_at", "created_by_event_id", "created_by_digest")

_THREAD_ARGUMENTS = ArrayArguments(
    [
        Column("id", "bigint", "id"),
        Column("search_space_id", "bigint", "search_space_id"),
        Column("created_at", "timestamptz", "created_at"),
        Column("updated_at", "timestamptz", "updated_at"),
        Column("created_by_id", "uuid", "created_by_id"),
        Column("created_by_at", "timestamptz", "created_by_at"),
        Column("created_by_event_id", "uuid", "created_by_event_id"),
        Column("created_by_digest", "bytea", "created_by_digest"),
    ]
)

_UPSERT_THREADS = f"""
INSERT INTO chat_threads AS t (id, search_space_id, created_at, updated_at, created_by_id,
                               created_by_at, created_by_event_id, created_by_digest)
SELECT {_THREAD_ARGUMENTS.values("v")} FROM {_THREAD_ARGUMENTS.unnest("v")}
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

_MESSAGE_ARGUMENTS = ArrayArguments(
    [
        Column("thread_id", "bigint", "key.thread_id"),
        Column("role", "text", "key.role"),
        Column("turn_id", "text", "key.turn_id"),
        Column("content", "json", "content"),
        Column("author_id", "uuid", "author_id"),
        Column("content_rank", "smallint", "claim.rank"),
        Column("content_at", "timestamptz", "claim.at"),
        Column("content_event_id", "uuid", "claim.event_id"),
        Column("content_digest", "bytea", "claim.digest"),
        Column("created_at", "timestamptz", "created_at"),
    ]
)

_MESSAGE_VALUES = f"""
SELECT {_MESSAGE_ARGUMENTS.values("v")}, now()
FROM {_MESSAGE_ARGUMENTS.unnest("v")}
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

# The usage row as the batch writes it, in one place: each column, its PostgreSQL type and the
# row attribute it is read from. The statement below, its arguments and its conflict update are
# built from this; the integration tests write it into the migrated table, the only source of
# schema.
USAGE_WRITTEN: tuple[Column, ...] = (
    *(Column(measure, "bigint", measure) for measure in USAGE_MEASURES),
    Column("model_breakdown", "jsonb", "model_breakdown"),
    Column("call_details", "json", "call_details"),
    Column("search_space_id", "bigint", "search_space_id"),
    Column("user_id", "uuid", "user_id"),
    Column("source", "text", "source"),
    Column("source_rank", "smallint", "claim.rank"),
    Column("source_at", "timestamptz", "claim.at"),
    Column("source_event_id", "uuid", "claim.event_id"),
    Column("source_digest", "bytea", "claim.digest"),
    Column("created_at", "timestamptz", "created_at"),
)
# What finds the usage row's message (thread, role, and turn or creating event): looked up, not
# written.
_USAGE_ARGUMENTS = ArrayArguments(
    [
        Column("thread_id", "bigint", "key.thread_id"),
        Column("role", "text", "key.role"),
        Column("turn_id", "text", "key.turn_id"),
        Column("origin_event_id", "uuid", "key.origin_event_id"),
        *USAGE_WRITTEN,
    ]
)
# A new winning claim takes every written column but created_at (the earliest stays).
_USAGE_TAKEN = [c.name for c in USAGE_WRITTEN if c.name != "created_at"]


_UPSERT_USAGE = f"""
WITH v AS (
  SELECT * FROM {_USAGE_ARGUMENTS.unnest("v")}
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
    {", ".join(c.name for c in USAGE_WRITTEN)})
  SELECT 'chat', j.thread_id, j.message_id, now(),
    {_USAGE_ARGUMENTS.values("j", [c.name for c in USAGE_WRITTEN])}
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
        written = await conn.fetch(_UPSERT_THREADS, *_THREAD_ARGUMENTS(plan.threads))
        if len(written) != len(plan.threads):
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
            await conn.execute(statement, *_MESSAGE_ARGUMENTS(rows))
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
        orphans = await conn.fetchval(_UPSERT_USAGE, *_USAGE_ARGUMENTS(u))
        if orphans:
            # The message rows were written above in this transaction, so only a concurrent
            # writer can have taken the key; the retry sees its row and decides again.
            raise ConcurrentWriteError(f"{orphans} usage rows found no message row to attach to")
