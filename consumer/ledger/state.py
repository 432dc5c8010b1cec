"""The stored registers a batch is reduced against (consumer/ledger/merge.py), read in its
transaction after taking a lock per thread:

    load_state  3 statements  lock the batch's threads (advisory, new ones too: another writer
                              of a thread - its records split over partitions - waits, so the
                              counters' view of the stored usage stays exact), then read their
                              stored registers and messages
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from consumer.ledger.claims import (
    Claim,
    MessageKey,
    StoredMessage,
    StoredState,
    ThreadRow,
    message_keys,
)
from producer.events import USAGE_MEASURES
from producer.ledger_event import LedgerEvent

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

# No FOR UPDATE: the advisory locks already make every other writer of these threads wait, and
# a row lock writes to each row it takes (a redelivered batch would write to every thread it
# names). A separate statement from the locks: its snapshot must be taken once they are held.
_LOAD_THREADS = """
SELECT id, search_space_id, created_at, updated_at, created_by_id, created_by_at,
       created_by_event_id, created_by_digest
FROM chat_threads WHERE id = ANY($1::bigint[])
ORDER BY id
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


def _batch_keys(events: Sequence[LedgerEvent]) -> tuple[set[int], set[MessageKey]]:
    threads = {event.thread_id for event in events}
    keys = {key for event in events for key in message_keys(event)}
    return threads, keys


async def load_state(conn: asyncpg.Connection, events: Sequence[LedgerEvent]) -> StoredState:
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
        # The columns of _LOAD_THREADS are ThreadRow's fields, in order.
        threads={row["id"]: ThreadRow(*row) for row in thread_rows},
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
        usage_totals={name: row[name] for name in USAGE_MEASURES} if has_usage else None,
        usage_breakdown=row["model_breakdown"] if has_usage else None,
    )
