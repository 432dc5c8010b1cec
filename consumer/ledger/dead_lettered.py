"""Which source positions a consumer group has dead-lettered (`dead_lettered`), so that reading
a range again (an offset `replay`, a fenced batch fetched again) sends no dead letter twice.

The batch transaction records its dead letters' positions after moving the offsets and before
sending them; the rows commit with the offsets that move past those positions, or not at all
(a dead letter that was sent but whose transaction rolled back is sent again: at-least-once,
as before). One statement both records and looks up: the positions it inserts are the ones to
send, those already there were sent by this group before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import asyncpg

from consumer.kafka.dead_letters import DeadLetter
from consumer.logs import fields

log = logging.getLogger(__name__)

# Sorted keys: two transactions inserting overlapping positions lock them in the same order.
# A stored position whose value differs is another record at the same offset (the topic was
# recreated): it is taken over and sent, never mistaken for the one sent before.
_RECORD = """
INSERT INTO dead_lettered AS d (group_id, topic, partition, "offset", reason, value_digest)
SELECT $1, v.topic, v.partition, v.position, v.reason, v.digest
FROM unnest($2::text[], $3::int[], $4::bigint[], $5::text[], $6::bytea[])
  AS v(topic, partition, position, reason, digest)
ORDER BY v.topic, v.partition, v.position
ON CONFLICT (group_id, topic, partition, "offset") DO UPDATE
  SET reason = excluded.reason, value_digest = excluded.value_digest, dead_lettered_at = now()
  WHERE d.value_digest <> excluded.value_digest
RETURNING topic, partition, "offset"
"""


async def record_dead_letters(
    conn: asyncpg.Connection, group_id: str, letters: Sequence[DeadLetter]
) -> list[DeadLetter]:
    """Record the letters' source positions for the group, inside the caller's transaction;
    the letters to send: those whose position (and value) the group had not dead-lettered
    before."""
    if not letters:
        return []
    # One row per position (ON CONFLICT refuses a second in one statement, SQLSTATE 21000):
    # the first letter of a position stands for it.
    by_position: dict[tuple[str, int, int], DeadLetter] = {}
    for x in letters:
        by_position.setdefault((x.record.topic, x.record.partition, x.record.offset), x)
    ordered = [by_position[key] for key in sorted(by_position)]
    rows = await conn.fetch(
        _RECORD,
        group_id,
        [x.record.topic for x in ordered],
        [x.record.partition for x in ordered],
        [x.record.offset for x in ordered],
        [x.reason.value for x in ordered],
        [hashlib.sha256(x.record.value or b"").digest() for x in ordered],
    )
    fresh = {(row["topic"], row["partition"], row["offset"]) for row in rows}
    new: list[DeadLetter] = []
    repeated: list[DeadLetter] = []
    for x in letters:  # in the given order
        key = (x.record.topic, x.record.partition, x.record.offset)
        (new if key in fresh and by_position[key] is x else repeated).append(x)
    if repeated:
        # The first dead letter of each stands; a line for whoever debugs a replay, not an
        # alert's worth.
        log.debug(
            "already dead-lettered by this group: not sent again",
            extra=fields(
                records=len(repeated),
                positions=[f"{x.record.partition}:{x.record.offset}" for x in repeated[:20]],
            ),
        )
    return new
