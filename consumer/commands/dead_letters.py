"""`token-ledger dlq list|replay`: the dead-letter topic as rows, and its records published to
their source topic again (docs/operations.md#dead-letters)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka.structs import ConsumerRecord

from consumer.commands.reading import (
    FETCH_BYTES,
    dead_letter_records,
    reader,
)
from consumer.kafka import dead_letters as dlq
from consumer.logs import fields
from consumer.settings import Settings
from producer.client import ProducerResource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetterView:
    partition: int
    offset: int
    reason: str
    detail: str
    source: str
    failed_at: str
    size: int


def _view(record: ConsumerRecord) -> DeadLetterView:
    # A header's value may be null (Kafka allows it, and a dead letter keeps the original's).
    headers = {k: (v or b"").decode(errors="replace") for k, v in (record.headers or ())}
    return DeadLetterView(
        partition=record.partition,
        offset=record.offset,
        reason=headers.get(dlq.REASON, "?"),
        detail=headers.get(dlq.DETAIL, ""),
        source=f"{headers.get(dlq.SOURCE_TOPIC, '?')}[{headers.get(dlq.SOURCE_PARTITION, '?')}]"
        f"@{headers.get(dlq.SOURCE_OFFSET, '?')}",
        failed_at=headers.get(dlq.FAILED_AT, ""),
        size=len(record.value or b""),
    )


async def list_dead_letters(settings: Settings, reason: str | None = None) -> list[DeadLetterView]:
    async with reader(settings) as consumer:
        views = [
            _view(record)
            async for record in dead_letter_records(
                settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
            )
        ]
    return [view for view in views if reason is None or view.reason == reason]


@dataclass(frozen=True)
class Replayed:
    """What `dlq replay` published (or would), and what it could not: records on the
    dead-letter topic whose headers name no source position (not written by a consumer)."""

    replayed: list[DeadLetterView]
    skipped: list[DeadLetterView]


async def replay_dead_letters(
    settings: Settings, reason: str | None = None, *, dry_run: bool = False
) -> Replayed:
    """Publish dead letters' original records to their source topic again (e.g. after a fix).

    Replaying is safe to repeat: the ledger dedupes events, and a record that is still bad
    returns to the dead-letter topic.
    """
    async with reader(settings) as consumer:
        chosen = [
            (record, dlq.source_position(record))
            async for record in dead_letter_records(
                settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
            )
            if reason is None or _view(record).reason == reason
        ]
    replayable = [(record, source) for record, source in chosen if source is not None]
    done = Replayed(
        replayed=[_view(record) for record, _ in replayable],
        skipped=[_view(record) for record, source in chosen if source is None],
    )
    for view in done.skipped:
        log.warning(
            "not replayed: the record names no source position",
            extra=fields(partition=view.partition, offset=view.offset),
        )
    if dry_run or not replayable:
        return done
    async with ProducerResource(
        settings.kafka_bootstrap,
        client_id="token-ledger-dlq-replay",
        max_request_size=FETCH_BYTES,
        **settings.kafka_security(),
    ) as producer:
        for record, source in replayable:
            original = [(k, v) for k, v in (record.headers or ()) if k not in dlq.LEDGER_HEADERS]
            await producer.send_and_wait(
                source.topic, record.value, key=record.key, headers=original
            )
    return done
