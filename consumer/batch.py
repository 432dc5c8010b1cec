"""One batch's records through the merge and into the ledger, without Kafka: decode them, and
apply what decodes under a savepoint, isolating what the database refuses. Used inside the
pipeline's transaction (consumer/pipeline.py owns offsets, retries and dead-letter delivery)
and by the property tests that feed arbitrary records through it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeAlias

import asyncpg
from aiokafka.structs import ConsumerRecord

from consumer.dlq import DeadLetter
from consumer.errors import PoisonError, classify_database_error
from consumer.logs import fields
from consumer.merge import BatchPlan, Outcome
from consumer.store import apply_events
from producer.events import AnyEvent, Rejection, RejectReason, decode_event

log = logging.getLogger(__name__)
# aiokafka ships no type information: a record is a ConsumerRecord[bytes, bytes].
Record: TypeAlias = ConsumerRecord


@dataclass
class Decoded:
    events: list[AnyEvent] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)  # the record of each event
    letters: list[DeadLetter] = field(default_factory=list)  # what cannot be an event


@dataclass
class Applied:
    """What one batch transaction did, for metrics and dead letters."""

    events: list[tuple[AnyEvent, Outcome]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    plans: list[BatchPlan] = field(default_factory=list)


def decode_records(records: list[Record], *, max_bytes: int, max_future_skew: timedelta) -> Decoded:
    decoded = Decoded()
    for record in records:
        result = decode_event(
            record.value,
            timestamp_ms=record.timestamp,
            max_bytes=max_bytes,
            max_future_skew=max_future_skew,
        )
        if isinstance(result, Rejection):
            decoded.letters.append(
                DeadLetter(record, result.reason, result.detail, result.event_type)
            )
        else:
            decoded.events.append(result)
            decoded.records.append(record)
    return decoded


async def apply_isolating(
    conn: asyncpg.Connection, items: list[tuple[AnyEvent, Record]], applied: Applied
) -> None:
    """Apply under a savepoint; on a data error split the batch until the record is alone."""
    if not items:
        return
    try:
        async with conn.transaction():
            plan = await apply_events(conn, [event for event, _ in items])
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
        await apply_isolating(conn, items[:middle], applied)
        await apply_isolating(conn, items[middle:], applied)
        return
    applied.plans.append(plan)
    for index, ((event, record), outcome) in enumerate(zip(items, plan.outcomes, strict=True)):
        applied.events.append((event, outcome))
        if rejection := plan.rejections.get(index):
            applied.letters.append(DeadLetter(record, rejection.reason, rejection.detail))
