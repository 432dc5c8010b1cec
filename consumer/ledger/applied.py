"""Which records a consumer group has applied, by position (`applied_records`), so that a
redelivery costs nothing: a record read again at its position (an offset `replay`) is
recognised from its bytes and never decoded, reduced or written again
(docs/design.md#redeliveries).

A record is known by its fingerprint: BLAKE2b of its value, personalised with its timestamp
(the two things decoding reads: a v0 body takes its occurred_at from the timestamp, and the
future-skew check compares with it). Two records with the same value and timestamp decode to
the same event, and applying an event twice changes nothing (the merge rules are idempotent),
so a record whose fingerprint is stored at its position was applied and may be skipped. A
different record at that position (a recreated topic) has another fingerprint, and is applied.

Each entry is 16 bytes: the event's type code (0: nothing applied there) and a 15-byte
fingerprint. A row holds one block of `BLOCK` offsets (`first_offset` is the block's first),
from there to the last offset applied in it. The batch transaction places the entries of the
records it applied (never those the database or the merge rejected) in their blocks' rows, with
its offsets: a stored entry means applied and committed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

import asyncpg
from aiokafka.structs import ConsumerRecord

from consumer.ledger.claims import Outcome
from consumer.logs import fields
from consumer.retry import as_transient
from producer.ledger_event import LedgerEvent

log = logging.getLogger(__name__)
BLOCK = 64  # offsets per row: a row stays within a page, never TOASTed
LOOKUP_SECONDS = 5.0
ENTRY = 16
_TYPE_CODES = {"turn.started": 1, "turn.finalized": 2, "message.appended": 3}
_TYPES = {code: name for name, code in _TYPE_CODES.items()}

Position = tuple[int, int]  # (partition, offset)
Record: TypeAlias = ConsumerRecord  # aiokafka's, untyped: a ConsumerRecord[bytes, bytes]

_LOOK_UP = """
SELECT a.partition, a.first_offset, a.entries
FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS v(partition, low, high)
JOIN applied_records AS a
  ON a.group_id = $1 AND a.topic = $2 AND a.partition = v.partition
 AND a.first_offset BETWEEN v.low AND v.high
"""

# One row per block, merged in place: a batch's entries are placed at their offsets in their
# block's row (the row padded with zeros up to them), so a caught-up consumer's small batches
# add to a row instead of each writing one. The offsets' compare-and-set, earlier in the same
# transaction, makes this group's batches on a partition take turns: no two insert one block.
_REMEMBER = """
WITH v AS (
  SELECT * FROM unnest($3::int[], $4::bigint[], $5::int[], $6::bytea[])
    AS v(partition, block, start, entries)
), merged AS (
  UPDATE applied_records AS a
  SET entries = overlay(
    CASE WHEN length(a.entries) < v.start
         THEN a.entries || decode(repeat('00', v.start - length(a.entries)), 'hex')
         ELSE a.entries END
    PLACING v.entries FROM v.start + 1)
  FROM v
  WHERE a.group_id = $1 AND a.topic = $2 AND a.partition = v.partition
    AND a.first_offset = v.block
  RETURNING a.partition, a.first_offset
)
INSERT INTO applied_records (group_id, topic, partition, first_offset, entries)
SELECT $1, $2, v.partition, v.block, decode(repeat('00', v.start), 'hex') || v.entries
FROM v
WHERE NOT EXISTS (
  SELECT FROM merged AS m WHERE m.partition = v.partition AND m.first_offset = v.block
)
ORDER BY v.partition, v.block
"""


def fingerprint(value: bytes | None, timestamp: int | None) -> bytes:
    """What a record is known by: its value, personalised with its timestamp."""
    person = b"n" if timestamp is None else b"t" + timestamp.to_bytes(8, "big", signed=True)
    return hashlib.blake2b(value or b"", digest_size=ENTRY - 1, person=person).digest()


def entry(event: LedgerEvent, print_: bytes) -> bytes:
    return bytes((_TYPE_CODES[event.type],)) + print_


def event_type(stored: bytes) -> str:
    """The type of the event applied at a recognised entry."""
    return _TYPES[stored[0]]


def recognised(
    rows: Iterable[tuple[int, int, bytes]], records: Mapping[Position, Record]
) -> dict[Position, bytes]:
    """Of these records by position, those whose fingerprint a stored row holds at their
    position, with the stored entry (pure). Only records a row covers are fingerprinted."""
    found: dict[Position, bytes] = {}
    for partition, first, entries in rows:
        for index in range(len(entries) // ENTRY):
            position = (partition, first + index)
            record = records.get(position)
            if record is None or position in found:
                continue
            stored = entries[index * ENTRY : (index + 1) * ENTRY]
            # A code this release does not know (a later release's event type, after a
            # rollback) is not recognised: the record is decoded, as a record never applied.
            if stored[0] in _TYPES and stored[1:] == fingerprint(record.value, record.timestamp):
                found[position] = stored
    return found


async def applied_before(
    conn: asyncpg.Connection | asyncpg.Pool,
    group_id: str,
    topic: str,
    records: Sequence[Record],
    *,
    seconds: float | None = None,
) -> dict[Position, bytes]:
    """Which of these records (of `topic`) the group applied before, by position, with each
    one's stored entry (`event_type` reads it)."""
    if not records:
        return {}
    spans: dict[int, list[int]] = {}
    for record in records:
        span = spans.setdefault(record.partition, [record.offset, record.offset])
        span[0], span[1] = min(span[0], record.offset), max(span[1], record.offset)
    partitions = sorted(spans)
    rows = await conn.fetch(
        _LOOK_UP,
        group_id,
        topic,
        partitions,
        [spans[p][0] // BLOCK * BLOCK for p in partitions],
        [spans[p][1] for p in partitions],
        timeout=seconds,
    )
    by_position = {(r.partition, r.offset): r for r in records}
    return recognised(
        ((row["partition"], row["first_offset"], row["entries"]) for row in rows), by_position
    )


async def recognise(
    pool: asyncpg.Pool, group_id: str, topic: str, records: Sequence[Record]
) -> dict[Position, bytes]:
    """applied_before, for the pipeline. Only an optimisation: when the database is away or
    does not answer within LOOKUP_SECONDS, nothing is recognised, every record is decoded and
    applied as if new (which changes nothing), and the batch transaction meets the outage,
    which its retries report. Any other error is raised."""
    try:
        async with pool.acquire(timeout=LOOKUP_SECONDS) as conn:
            return await applied_before(conn, group_id, topic, records, seconds=LOOKUP_SECONDS)
    except Exception as error:
        if as_transient(error) is None:
            raise
        log.debug(
            "could not look up the records applied before: decoding every record",
            extra=fields(records=len(records), error=type(error).__name__),
        )
        return {}


def rows_of(
    entries: Mapping[Position, bytes], kept: Mapping[Position, bytes] | None = None
) -> list[tuple[int, int, int, bytes]]:
    """New entries by position as (partition, block, start, entries): per partition and block
    of BLOCK offsets with a new entry, the entries from its first new offset to its last, to
    be placed `start` bytes into the block's row. Between them: the `kept` entries (what the
    row holds for records recognised in the same batch, which would otherwise be overwritten),
    else zeros (nothing applied there)."""
    kept = kept or {}
    blocks: dict[tuple[int, int], list[int]] = defaultdict(list)
    for partition, offset in entries:
        blocks[partition, offset // BLOCK * BLOCK].append(offset)
    rows = []
    for (partition, block), offsets in sorted(blocks.items()):
        first, last = min(offsets), max(offsets)
        buffer = bytearray((last - first + 1) * ENTRY)
        for offset in range(first, last + 1):
            value = entries.get((partition, offset)) or kept.get((partition, offset))
            if value is not None:
                start = (offset - first) * ENTRY
                buffer[start : start + ENTRY] = value
        rows.append((partition, block, (first - block) * ENTRY, bytes(buffer)))
    return rows


async def remember_applied(
    conn: asyncpg.Connection,
    group_id: str,
    topic: str,
    applied: Sequence[tuple[Position, LedgerEvent, bytes, Outcome]],
    kept: Mapping[Position, bytes],
) -> None:
    """Store the entries of the records a batch applied (in its transaction). A record the
    merge or the database rejected is not applied: it is judged again when read again.
    `kept`: the stored entries of the records the batch recognised, written again only where
    they lie between new ones."""
    entries = {
        position: entry(event, print_)
        for position, event, print_, outcome in applied
        if outcome is not Outcome.REJECTED
    }
    if not entries:
        return
    rows = rows_of(entries, kept)
    await conn.execute(
        _REMEMBER,
        group_id,
        topic,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )
