"""One batch's records into the ledger, top down (the pipeline owns retries and Kafka):

  1. decode_records   every record becomes an event or a dead letter (pure); a record this
                      group applied before (ledger/applied.py, looked up by the pipeline) is
                      counted as a redelivery and not decoded
  2. commit_batch     one transaction:
     a. advance the stored offsets by compare-and-set from where this owner expects them
        (first: a zombie owner blocks here, then finds them moved and is fenced)
     b. apply_isolating: load the stored registers, reduce the batch against them
        (merge.reduce_batch), write what changes; a record the database rejects (SQLSTATE
        22/23) is isolated by splitting the batch under savepoints; then store the
        fingerprints of the records applied (ledger/applied.py)
     c. dead-letter what could not be decoded and what the transaction rejected: record
        their positions in `dead_lettered` (ledger/dead_lettered.py) and send those this group
        had not sent before, awaited (acknowledged before COMMIT)

Also used without Kafka by the property tests, which feed arbitrary records through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeAlias

import asyncpg
from aiokafka.structs import ConsumerRecord

from consumer.errors import PoisonError, TransientError, classify_database_error
from consumer.kafka.dead_letters import DeadLetter
from consumer.ledger.applied import Position, fingerprint, remember_applied
from consumer.ledger.claims import BatchPlan, EventRows, Outcome, event_rows
from consumer.ledger.dead_lettered import record_dead_letters
from consumer.ledger.decode import BatchDecoder
from consumer.ledger.merge import reduce_batch
from consumer.ledger.offsets import OffsetMove, advance_offsets
from consumer.ledger.state import load_state
from consumer.ledger.store import write_plan
from consumer.logs import fields
from producer.events import Rejection, RejectReason
from producer.ledger_event import LedgerEvent

log = logging.getLogger(__name__)
# aiokafka ships no type information: a record is a ConsumerRecord[bytes, bytes].
Record: TypeAlias = ConsumerRecord
Report = Callable[[Sequence[DeadLetter]], Awaitable[None]]


@dataclass
class Decoded:
    events: list[LedgerEvent] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)  # the record of each event
    letters: list[DeadLetter] = field(default_factory=list)  # what cannot be an event
    prints: list[bytes] = field(default_factory=list)  # the fingerprint of each event's record
    # Each event's candidate rows, built here, beside the batch in flight: not in this batch's
    # transaction, which only folds them.
    rows: list[EventRows] = field(default_factory=list)
    # Records this group applied before (ledger/applied.py), with their stored entries: not
    # decoded, nothing of them written again.
    redelivered: list[tuple[Record, bytes]] = field(default_factory=list)
    # Per event type, fields of the records that this consumer does not know (a metric).
    unknown_fields: dict[str, int] = field(default_factory=dict)


@dataclass
class Applied:
    """What one batch transaction did, for metrics and dead letters."""

    events: list[tuple[LedgerEvent, Outcome]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)  # what the database rejected
    plans: list[BatchPlan] = field(default_factory=list)
    # The dead letters sent (decoded and rejected), less those this group had sent before.
    sent: list[DeadLetter] = field(default_factory=list)


class Decoding:
    """Step 1 for one batch, a slice of records at a time (the pipeline yields to the batch in
    flight between slices)."""

    def __init__(self, *, max_bytes: int, max_future_skew: timedelta) -> None:
        self.decoded = Decoded()
        self._decode = BatchDecoder(max_bytes=max_bytes, max_future_skew=max_future_skew)
        self.decoded.unknown_fields = self._decode.unknown_fields

    def add(self, records: Iterable[Record], known: Mapping[Position, bytes] | None = None) -> None:
        """Decode these records into the batch; `known`: those of them this group applied
        before, by position, with their stored entries (counted, not decoded)."""
        decoded, decode = self.decoded, self._decode
        for record in records:
            if known and (stored := known.get((record.partition, record.offset))):
                decoded.redelivered.append((record, stored))
                continue
            result = decode(record.value, record.timestamp)
            if isinstance(result, Rejection):
                decoded.letters.append(
                    DeadLetter(record, result.reason, result.detail, result.event_type)
                )
            else:
                decoded.events.append(result)
                decoded.records.append(record)
                decoded.prints.append(fingerprint(record.value, record.timestamp))
                decoded.rows.append(event_rows(result))


def decode_records(records: list[Record], *, max_bytes: int, max_future_skew: timedelta) -> Decoded:
    decoding = Decoding(max_bytes=max_bytes, max_future_skew=max_future_skew)
    decoding.add(records)
    return decoding.decoded


# Records decoded between two turns of the batch in flight: ~0.2 ms of work. When PostgreSQL
# answers one of that batch's statements, the next waits for the slice being decoded to end;
# 128 records (~4 ms) held the transaction up long enough to cost a first drain ~15 % of its
# rate (docs/development.md#benchmarks).
DECODE_SLICE = 8


async def decode_in_slices(
    decoding: Decoding,
    records: list[Record],
    *,
    busy: Callable[[], bool],
    known: Mapping[Position, bytes] | None = None,
) -> None:
    """Decoding.add a slice at a time, yielding to the event loop between slices while
    `busy` (a batch in flight): that batch sends its next statement as soon as PostgreSQL
    answers the last one, not once this whole batch is decoded, so the database works
    meanwhile. `known`: the records applied before, by position (not decoded)."""
    for start in range(0, len(records), DECODE_SLICE):
        decoding.add(records[start : start + DECODE_SLICE], known)
        if busy():
            await asyncio.sleep(0)


async def commit_batch(
    pool: asyncpg.Pool,
    group_id: str,
    topic: str,
    moves: Sequence[OffsetMove],
    decoded: Decoded,
    report: Report,
) -> Applied:
    """Steps 2a-2c in one transaction: rows and offsets commit together or not at all."""
    applied = Applied()
    try:
        conn = await pool.acquire()
    except TimeoutError as error:  # no connection: not a batch too big for its timeout
        raise TransientError("database unreachable: connecting timed out") from error
    try:
        async with conn.transaction():
            await advance_offsets(conn, group_id, topic, moves)  # 2a
            await apply_isolating(
                conn,
                list(zip(decoded.events, decoded.records, strict=True)),
                applied,
                rows=decoded.rows,
            )  # 2b
            # apply_isolating keeps the records' order, split or not.
            outcomes = (outcome for _, outcome in applied.events)
            await remember_applied(
                conn,
                group_id,
                topic,
                [
                    ((record.partition, record.offset), event, print_, outcome)
                    for event, record, print_, outcome in zip(
                        decoded.events, decoded.records, decoded.prints, outcomes, strict=True
                    )
                ],
                {(r.partition, r.offset): stored for r, stored in decoded.redelivered},
            )
            if letters := [*decoded.letters, *applied.letters]:  # 2c
                applied.sent = await record_dead_letters(conn, group_id, letters)
                await report(applied.sent)
    finally:
        await pool.release(conn)
    return applied


async def apply_events(
    conn: asyncpg.Connection,
    events: Sequence[LedgerEvent],
    rows: Sequence[EventRows] | None = None,
) -> BatchPlan:
    """Read the stored registers, reduce the batch against them, write what changes. `rows`:
    each event's candidate rows, if the decoding built them.

    Must run inside the caller's transaction (together with `advance_offsets`)."""
    plan = reduce_batch(events, await load_state(conn, events), rows)
    await write_plan(conn, plan)
    return plan


Apply = Callable[
    [asyncpg.Connection, Sequence[LedgerEvent], Sequence[EventRows] | None], Awaitable[BatchPlan]
]


async def apply_isolating(
    conn: asyncpg.Connection,
    items: list[tuple[LedgerEvent, Record]],
    applied: Applied,
    apply: Apply = apply_events,
    *,
    rows: Sequence[EventRows] | None = None,
) -> None:
    """Apply under a savepoint; on a data error split the batch until the record is alone.
    (`apply`: the unit tests' stand-in for the database; `rows`: the items' candidate rows,
    if built.)"""
    if not items:
        return
    try:
        async with conn.transaction():
            plan = await apply(conn, [event for event, _ in items], rows)
    except asyncpg.PostgresError as error:
        mapped = classify_database_error(error)
        if not isinstance(mapped, PoisonError):
            raise
        if len(items) == 1:
            event, record = items[0]
            log.warning(
                "record rejected by the database",
                extra=fields(partition=record.partition, offset=record.offset, error=str(mapped)),
            )
            applied.letters.append(DeadLetter(record, RejectReason.DATABASE_REJECTED, str(mapped)))
            applied.events.append((event, Outcome.REJECTED))
            return
        middle = len(items) // 2
        halves = (None, None) if rows is None else (rows[:middle], rows[middle:])
        await apply_isolating(conn, items[:middle], applied, apply, rows=halves[0])
        await apply_isolating(conn, items[middle:], applied, apply, rows=halves[1])
        return
    applied.plans.append(plan)
    for index, ((event, record), outcome) in enumerate(zip(items, plan.outcomes, strict=True)):
        applied.events.append((event, outcome))
        if rejection := plan.rejections.get(index):
            applied.letters.append(DeadLetter(record, rejection.reason, rejection.detail))
