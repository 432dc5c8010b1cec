"""The hot path's SQL (operators' read-side SQL is in queries.py). Every statement is
set-based (UNNEST over arrays), so a batch costs the same handful of round trips whatever its
size:

    advance_offsets  1-2 statements  compare-and-set of consumer_offsets (first: it serialises
                                     two owners of a partition before any ledger row is locked)
    load_state       3 statements    lock the batch's threads (advisory, new ones too: another
                                     writer of a thread - its records split over partitions -
                                     waits, so the counters' view of the stored usage stays
                                     exact), then read their stored registers and messages
    write_plan       <= 5 statements guarded upserts: threads, turn messages, turn-less
                                     messages (+ a check that no other writer keyed another
                                     message by the same event_id), token usage; keys sorted
                                     to avoid deadlocks

Every upsert repeats its partial index predicate in the conflict target and carries a guard
(`DO UPDATE ... WHERE new claim beats stored claim`) so stored rows only move forward under the
merge rules, whatever a concurrent writer did since `load_state` read them.
SQL only: the merge runs in consumer/batch.py, between `load_state` and `write_plan`. The
caller owns the transaction: rows and offsets commit together or not at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from consumer.errors import ConcurrentWriteError, FencedError, ThreadRaceError
from consumer.ledger.merge import (
    USAGE_FIELDS,
    BatchPlan,
    Claim,
    MessageKey,
    StoredMessage,
    StoredState,
    ThreadRow,
    message_keys,
)
from producer import jsonvalues
from producer.events import AnyEvent, attribution


def canonical_json(value: Any) -> str:
    """The JSON text written to jsonb columns (compact, unicode and exact numbers kept)."""
    return jsonvalues.dumps(value)


def asyncpg_dsn(database_url: str) -> str:
    """libpq form of a SQLAlchemy URL (drops the '+asyncpg' driver suffix)."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_pool(database_url: str, *, max_size: int = 4) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(database_url),
        min_size=0,  # start even while the database is away: batches retry until it is back
        max_size=max_size,
        timeout=5,  # connecting: a database that is down must not hold a batch for long
        command_timeout=60,
        server_settings={"application_name": "token-ledger"},
    )
    return pool


async def ping(pool: asyncpg.Pool, seconds: float = 2.0) -> bool:
    """Whether the database answers right now (for /readyz)."""
    try:
        async with asyncio.timeout(seconds):
            return bool(await pool.fetchval("SELECT 1"))
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        # A pooled connection that has read its server's FATAL (a restart terminating idle
        # backends) but not yet its close: the pool terminates it on release.
        asyncpg.InternalClientError,
    ):
        return False


# -- offsets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OffsetMove:
    partition: int
    expected: int | None  # the stored next_offset this batch starts from; None: no row yet
    next_offset: int


_ADVANCE = """
UPDATE consumer_offsets AS o SET next_offset = v.next_offset, updated_at = now(),
  applied_until = greatest(o.applied_until, v.next_offset)
FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS v(partition, expected, next_offset)
WHERE o.group_id = $1 AND o.topic = $2 AND o.partition = v.partition
  AND o.next_offset = v.expected
RETURNING o.partition
"""

_CLAIM = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at, applied_until)
SELECT $1, $2, v.partition, v.next_offset, now(), v.next_offset
FROM unnest($3::int[], $4::bigint[]) AS v(partition, next_offset)
ORDER BY v.partition
ON CONFLICT (group_id, topic, partition) DO NOTHING
RETURNING partition
"""


async def advance_offsets(
    conn: asyncpg.Connection, group_id: str, topic: str, moves: Sequence[OffsetMove]
) -> None:
    """Move each partition's next_offset from `expected`; FencedError if any has moved."""
    moves = sorted(moves, key=lambda m: m.partition)
    known = [m for m in moves if m.expected is not None]
    fresh = [m for m in moves if m.expected is None]
    done: set[int] = set()
    if known:
        rows = await conn.fetch(
            _ADVANCE,
            group_id,
            topic,
            [m.partition for m in known],
            [m.expected for m in known],
            [m.next_offset for m in known],
        )
        done.update(row["partition"] for row in rows)
    if fresh:
        rows = await conn.fetch(
            _CLAIM, group_id, topic, [m.partition for m in fresh], [m.next_offset for m in fresh]
        )
        done.update(row["partition"] for row in rows)
    if missed := sorted({m.partition for m in moves} - done):
        raise FencedError(missed)


async def reset_offsets(
    conn: asyncpg.Connection,
    group_id: str,
    topic: str,
    partition: int,
    expected: int | None,
    next_offset: int,
) -> None:
    """Move one partition's stored next_offset from `expected` to `next_offset` (either way;
    used when the stored offset lies outside the partition's log). FencedError if it moved."""
    if expected is None:
        return await advance_offsets(
            conn, group_id, topic, [OffsetMove(partition, None, next_offset)]
        )
    # Forward (the log's start passed the stored offset): the ledger still holds what it
    # applied beyond. Backward (the log is younger than the ledger): those records are gone.
    moved = await conn.fetchval(
        "UPDATE consumer_offsets SET next_offset = $5, updated_at = now(),"
        " applied_until = CASE WHEN $5 > next_offset THEN greatest(applied_until, $5) ELSE $5 END"
        " WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset = $4"
        " RETURNING partition",
        group_id,
        topic,
        partition,
        expected,
        next_offset,
    )
    if moved is None:
        raise FencedError([partition])


async def load_offsets(
    conn: asyncpg.Connection, group_id: str, topic: str, partitions: Iterable[int]
) -> dict[int, int]:
    """Stored next_offset per partition (partitions without a row are absent)."""
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM consumer_offsets"
        " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])",
        group_id,
        topic,
        sorted(partitions),
    )
    return {row["partition"]: row["next_offset"] for row in rows}


# -- stored state ----------------------------------------------------------------------------

# One transaction-scoped advisory lock per thread, in id order, whether or not the thread has
# a row yet: two writers of one thread (its records split over partitions, so over members)
# take turns, and each reads the stored registers the other committed. Row locks alone cannot
# do that for a thread neither has written yet: both would count its usage as new. The key is
# the id's two 32-bit halves (the two-integer key space does not overlap the bigint one, where
# the relay's lock is).
_LOCK_THREADS = """
SELECT count(pg_advisory_xact_lock((k >> 32)::int, ((k & 4294967295) - 2147483648)::int))
FROM (SELECT k FROM unnest($1::bigint[]) AS k ORDER BY k) AS t
"""

_LOAD_THREADS = """
SELECT id, search_space_id, created_at, updated_at, created_by_id, created_by_at,
       created_by_event_id, created_by_digest
FROM chat_threads WHERE id = ANY($1::bigint[])
ORDER BY id FOR UPDATE
"""

_MESSAGE_REGISTERS = """
m.thread_id, m.role, m.turn_id, m.content_rank, m.content_at, m.content_event_id,
m.content_digest, m.created_at,
u.source_rank, u.source_at, u.source_event_id, u.source_digest,
u.created_at AS usage_created_at, u.model_breakdown,
u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost_micros
"""

_LOAD_MESSAGES = f"""
SELECT {_MESSAGE_REGISTERS}
FROM unnest($1::bigint[], $2::text[], $3::text[]) AS k(thread_id, turn_id, role)
JOIN chat_messages AS m
  ON m.thread_id = k.thread_id AND m.turn_id = k.turn_id AND m.role = k.role
LEFT JOIN token_usage AS u ON u.message_id = m.id
UNION ALL
SELECT {_MESSAGE_REGISTERS}
FROM chat_messages AS m LEFT JOIN token_usage AS u ON u.message_id = m.id
WHERE m.turn_id IS NULL AND m.content_event_id = ANY($4::uuid[])
"""


def _batch_keys(events: Sequence[AnyEvent]) -> tuple[set[int], set[MessageKey]]:
    threads = {event.thread_id for event in events}
    keys = {key for event in events for key in message_keys(event)}
    return threads, keys


async def load_state(conn: asyncpg.Connection, events: Sequence[AnyEvent]) -> StoredState:
    """The stored registers of every thread and message the batch touches."""
    thread_ids, keys = _batch_keys(events)
    turn_keys = sorted((k for k in keys if k.turn_id is not None), key=MessageKey.sort_key)
    origins = sorted(k.origin_event_id for k in keys if k.origin_event_id is not None)
    await conn.fetchval(_LOCK_THREADS, sorted(thread_ids))
    thread_rows = await conn.fetch(_LOAD_THREADS, sorted(thread_ids))
    message_rows = await conn.fetch(
        _LOAD_MESSAGES,
        [k.thread_id for k in turn_keys],
        [k.turn_id for k in turn_keys],
        [k.role for k in turn_keys],
        origins,
    )
    return StoredState(
        threads={row["id"]: ThreadRow(**dict(row)) for row in thread_rows},
        messages={stored_key(row): _stored_message(row) for row in message_rows},
    )


def stored_key(row: Mapping[str, Any]) -> MessageKey:
    turn_id = row["turn_id"]
    origin = None if turn_id is not None else row["content_event_id"]
    return MessageKey(row["thread_id"], row["role"], turn_id, origin)


def content_claim(row: Mapping[str, Any]) -> Claim:
    return Claim(
        row["content_rank"], row["content_at"], row["content_event_id"], row["content_digest"]
    )


def source_claim(row: Mapping[str, Any]) -> Claim:
    return Claim(row["source_rank"], row["source_at"], row["source_event_id"], row["source_digest"])


def _stored_message(row: Mapping[str, Any]) -> StoredMessage:
    has_usage = row["source_event_id"] is not None
    return StoredMessage(
        claim=content_claim(row),
        created_at=row["created_at"],
        usage_claim=source_claim(row) if has_usage else None,
        usage_created_at=row["usage_created_at"],
        usage_attribution=attribution(
            {name: row[name] for name in USAGE_FIELDS}, jsonvalues.loads(row["model_breakdown"])
        )
        if has_usage
        else None,
    )


# -- writes ----------------------------------------------------------------------------------


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

_USAGE_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_micros",
    "model_breakdown",
    "call_details",
    "search_space_id",
    "user_id",
    "source",
    "source_rank",
    "source_at",
    "source_event_id",
    "source_digest",
)

_UPSERT_USAGE = f"""
WITH v AS (
  SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::uuid[], $5::bigint[],
                       $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[],
                       $11::bigint[], $12::uuid[], $13::text[], $14::smallint[],
                       $15::timestamptz[], $16::uuid[], $17::bytea[], $18::timestamptz[])
    AS v(thread_id, role, turn_id, origin_event_id, prompt_tokens, completion_tokens,
         total_tokens, cost_micros, model_breakdown, call_details, search_space_id, user_id,
         source, source_rank, source_at, source_event_id, source_digest, created_at)
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
  INSERT INTO token_usage AS u (usage_type, prompt_tokens, completion_tokens, total_tokens,
    cost_micros, model_breakdown, call_details, thread_id, message_id, search_space_id,
    user_id, source, source_rank, source_at, source_event_id, source_digest, created_at,
    updated_at)
  SELECT 'chat', j.prompt_tokens, j.completion_tokens, j.total_tokens, j.cost_micros,
         j.model_breakdown::jsonb, j.call_details::jsonb, j.thread_id, j.message_id,
         j.search_space_id, j.user_id, j.source, j.source_rank, j.source_at,
         j.source_event_id, j.source_digest, j.created_at, now()
  FROM joined AS j WHERE j.message_id IS NOT NULL
  ORDER BY j.message_id
  ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO UPDATE SET
    {_take_if(_USAGE_WINS, "u", _USAGE_COLUMNS)},
    created_at = LEAST(u.created_at, EXCLUDED.created_at),
    updated_at = now()
  WHERE {_USAGE_WINS} OR EXCLUDED.created_at < u.created_at
  RETURNING 1
)
SELECT count(*) FILTER (WHERE message_id IS NULL) AS orphans FROM joined
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
            await conn.execute(
                statement,
                [r.key.thread_id for r in rows],
                [r.key.role for r in rows],
                [r.key.turn_id for r in rows],
                [canonical_json(r.content) for r in rows],
                [r.author_id for r in rows],
                [r.claim.rank for r in rows],
                [r.claim.at for r in rows],
                [r.claim.event_id for r in rows],
                [r.claim.digest for r in rows],
                [r.created_at for r in rows],
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
        orphans = await conn.fetchval(
            _UPSERT_USAGE,
            [r.key.thread_id for r in u],
            [r.key.role for r in u],
            [r.key.turn_id for r in u],
            [r.key.origin_event_id for r in u],
            [r.prompt_tokens for r in u],
            [r.completion_tokens for r in u],
            [r.total_tokens for r in u],
            [r.cost_micros for r in u],
            [canonical_json(r.model_breakdown) for r in u],
            [canonical_json(r.call_details) for r in u],
            [r.search_space_id for r in u],
            [r.user_id for r in u],
            [r.source for r in u],
            [r.claim.rank for r in u],
            [r.claim.at for r in u],
            [r.claim.event_id for r in u],
            [r.claim.digest for r in u],
            [r.created_at for r in u],
        )
        if orphans:
            # The message rows were written above in this transaction, so only a concurrent
            # writer can have taken the key; the retry sees its row and decides again.
            raise ConcurrentWriteError(f"{orphans} usage rows found no message row to attach to")
