"""Forgetting positions no reader can reach again (docs/design.md#redeliveries).

`applied_records` and `dead_lettered` remember records by their position, for as long as
someone may read the position again: an offset `replay`, a rebalance. Below a partition's log
start offset (Kafka deleted those records: retention, `kafka-delete-records`), nobody can, so
what the tables hold there only takes space. This drops it, for every group that consumed the
topic: a log start belongs to the topic, not to a group.

An `applied_records` row goes once its whole block is below the log start. A stored position
that a concurrent batch writes at the same moment (fetched just before Kafka deleted it) is
dropped on the next pass: forgetting it costs nothing but a decode, should it ever be read,
which it cannot be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from consumer.ledger.applied import BLOCK

# Per group of the topic (its consumer_offsets rows) and partition: the primary keys lead with
# (group_id, topic, partition), so each is one index range, never a scan of other groups' rows.
# At most $4 rows a statement, so that years of rows, forgotten the first time, never hold one
# statement past the pool's command timeout.
_DOOMED = """
SELECT x.group_id, x.partition, x.{position}
FROM (SELECT DISTINCT o.group_id FROM consumer_offsets AS o WHERE o.topic = $1) AS g
CROSS JOIN unnest($2::int[], $3::bigint[]) AS s(partition, log_start)
JOIN {table} AS x ON x.group_id = g.group_id AND x.topic = $1 AND x.partition = s.partition
  AND x.{position} <= s.log_start - {span}
LIMIT $4
"""

_FORGET_APPLIED = f"""
DELETE FROM applied_records AS a
USING ({_DOOMED.format(table="applied_records", position="first_offset", span=BLOCK)}) AS d
WHERE a.group_id = d.group_id AND a.topic = $1 AND a.partition = d.partition
  AND a.first_offset = d.first_offset
"""

_FORGET_DEAD_LETTERED = f"""
DELETE FROM dead_lettered AS l
USING ({_DOOMED.format(table="dead_lettered", position='"offset"', span=1)}) AS d
WHERE l.group_id = d.group_id AND l.topic = $1 AND l.partition = d.partition
  AND l."offset" = d."offset"
"""
ROWS_PER_STATEMENT = 10_000


@dataclass(frozen=True)
class Forgotten:
    applied_rows: int
    dead_lettered: int

    def __bool__(self) -> bool:
        return bool(self.applied_rows or self.dead_lettered)


async def forget_below(
    conn: asyncpg.Connection, topic: str, log_starts: Mapping[int, int]
) -> Forgotten:
    """Drop what the tables remember below each partition's log start (partition -> offset).
    Each statement is its own transaction: none holds locks while waiting for another."""
    partitions = sorted(log_starts)
    starts = [log_starts[p] for p in partitions]
    counts = []
    for statement in (_FORGET_APPLIED, _FORGET_DEAD_LETTERED):
        total = 0
        while True:
            status = await conn.execute(statement, topic, partitions, starts, ROWS_PER_STATEMENT)
            deleted = int(status.rpartition(" ")[2])  # "DELETE 12"
            total += deleted
            if deleted < ROWS_PER_STATEMENT:
                break
        counts.append(total)
    return Forgotten(*counts)
