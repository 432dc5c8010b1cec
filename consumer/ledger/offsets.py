"""Where each partition stands, in `consumer_offsets`: the source of truth for the Kafka loop
(docs/design.md#checkpointing). Every move is a compare-and-set from where the caller expects
the stored offset, so that a zombie owner after a rebalance is fenced (FencedError). A batch
moves its offsets first in its transaction: two owners of a partition serialise there before
any ledger row is locked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from consumer.errors import FencedError


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


# -- stopped partitions (partition_halts): what `token-ledger status` shows ------------------

_HALT = """
INSERT INTO partition_halts (group_id, topic, partition, reason, halted_at)
SELECT $1, $2, v.partition, $4, now() FROM unnest($3::int[]) AS v(partition)
ORDER BY v.partition
ON CONFLICT (group_id, topic, partition) DO UPDATE SET reason = EXCLUDED.reason,
  halted_at = CASE WHEN partition_halts.reason = EXCLUDED.reason
                   THEN partition_halts.halted_at ELSE EXCLUDED.halted_at END
"""


async def record_halts(
    conn: asyncpg.Connection, group_id: str, topic: str, partitions: Iterable[int], reason: str
) -> None:
    """Stopped partitions, and why (a partition stopped again for the same reason keeps the
    time it first stopped)."""
    await conn.execute(_HALT, group_id, topic, sorted(partitions), reason)


async def clear_halts(
    conn: asyncpg.Connection, group_id: str, topic: str, partitions: Iterable[int]
) -> None:
    """A new owner judges these partitions afresh: their recorded halts go (one recurs if its
    cause lasts)."""
    await conn.execute(
        "DELETE FROM partition_halts"
        " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])",
        group_id,
        topic,
        sorted(partitions),
    )


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


async def last_commit_time(pool: asyncpg.Pool, group_id: str, topic: str) -> float | None:
    """When the group last committed a batch of the topic (any member, any release), as a Unix
    time; None before its first."""
    moment = await pool.fetchval(
        "SELECT extract(epoch FROM max(updated_at))::float8 FROM consumer_offsets"
        " WHERE group_id = $1 AND topic = $2",
        group_id,
        topic,
    )
    return None if moment is None else float(moment)
