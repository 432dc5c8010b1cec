"""Forgetting positions no reader can reach again (docs/design.md#redeliveries).

`applied_records` and `dead_lettered` remember records by their position, for as long as
someone may read the position again: an offset `replay`, a rebalance. Below a partition's log
start offset (Kafka deleted those records: retention, `kafka-delete-records`), nobody can, so
what the tables hold there only takes space. A group forgets its own rows only: it knows the
log it reads, and another group of the same database may read a topic of the same name on
another cluster (a migration under a new group).

An `applied_records` row goes once its whole block is below the log start. A position that a
concurrent batch writes at the same moment (fetched just before Kafka deleted it) is dropped
on the next pass; forgetting a position wrongly would cost a decode, or a dead letter sent
again, never a row of the ledger: both tables only spare work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from consumer.ledger.applied import BLOCK

# Per partition, one range of the primary key (group_id, topic, partition, position), at most
# $5 rows a statement, deleted by ctid: years of rows, forgotten the first time, never hold a
# statement past the pool's command timeout, and no statement reads rows it does not delete.
_FORGET = """
DELETE FROM {table} WHERE ctid = ANY(ARRAY(
  SELECT x.ctid
  FROM unnest($3::int[], $4::bigint[]) AS s(partition, log_start)
  CROSS JOIN LATERAL (
    SELECT t.ctid FROM {table} AS t
    WHERE t.group_id = $1 AND t.topic = $2 AND t.partition = s.partition
      AND t.{position} <= s.log_start - {span}
    ORDER BY t.{position}
    LIMIT $5
  ) AS x
  LIMIT $5
))
"""
_FORGET_APPLIED = _FORGET.format(table="applied_records", position="first_offset", span=BLOCK)
_FORGET_DEAD_LETTERED = _FORGET.format(table="dead_lettered", position='"offset"', span=1)
ROWS_PER_STATEMENT = 10_000


@dataclass(frozen=True)
class Forgotten:
    applied_rows: int
    dead_lettered: int

    def __bool__(self) -> bool:
        return bool(self.applied_rows or self.dead_lettered)


async def forget_below(
    conn: asyncpg.Connection, group_id: str, topic: str, log_starts: Mapping[int, int]
) -> Forgotten:
    """Drop what the group's rows hold below each partition's log start (partition ->
    offset). Each statement is its own transaction: none holds locks while waiting for
    another."""
    partitions = sorted(log_starts)
    starts = [log_starts[p] for p in partitions]
    counts = []
    for statement in (_FORGET_APPLIED, _FORGET_DEAD_LETTERED):
        total = 0
        while True:
            status = await conn.execute(
                statement, group_id, topic, partitions, starts, ROWS_PER_STATEMENT
            )
            deleted = int(status.rpartition(" ")[2])  # "DELETE 12"
            total += deleted
            if deleted < ROWS_PER_STATEMENT:
                break
        counts.append(total)
    return Forgotten(*counts)
