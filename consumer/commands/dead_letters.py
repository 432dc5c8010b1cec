"""`token-ledger dlq list|replay`: the dead-letter topic as rows, and its records published to
their source topic again, once per source record (docs/operations.md#dead-letters)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

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
    group: str = ""  # the consumer group that sent it ("" if an older consumer did)
    origin: str = ""  # a replayed record's first position ("" if never replayed)


def _at(position: dlq.SourcePosition | None) -> str:
    return "" if position is None else f"{position.topic}[{position.partition}]@{position.offset}"


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
        group=headers.get(dlq.GROUP, ""),
        origin=_at(dlq.origin_position(record)),
    )


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command takes: by reason, and by the time the dead letter was
    written (its Kafka record timestamp: since inclusive, until exclusive)."""

    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __call__(self, record: ConsumerRecord) -> bool:
        if self.since is not None and record.timestamp < _millis(self.since):
            return False
        if self.until is not None and record.timestamp >= _millis(self.until):
            return False
        return self.reason is None or _view(record).reason == self.reason


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Listed:
    views: list[DeadLetterView]
    matched: int  # before --limit


async def list_dead_letters(
    settings: Settings, selection: Selection | None = None, *, limit: int | None = None
) -> Listed:
    """The selected dead letters in the topic's order (partition, offset); the first `limit`."""
    chosen = selection or Selection()
    views: list[DeadLetterView] = []
    matched = 0
    async with reader(settings) as consumer:
        async for record in dead_letter_records(
            settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
        ):
            if chosen(record):
                matched += 1
                if limit is None or len(views) < limit:
                    views.append(_view(record))
    return Listed(views, matched)


@dataclass(frozen=True)
class OnePerOrigin:
    """Dead letters grouped by the source record they stand for (dead_letters.first_position):
    the latest of each, with its origin; the copies it stands for; those naming no position."""

    latest: list[tuple[ConsumerRecord, dlq.SourcePosition]]
    copies: int
    unnamed: list[ConsumerRecord]


def one_per_origin(records: Iterable[ConsumerRecord]) -> OnePerOrigin:
    """The latest dead letter of each origin (by record timestamp, then topic position), in
    the origins' order: replayed, they reach the source topic in the order they first had."""
    latest: dict[dlq.SourcePosition, ConsumerRecord] = {}
    unnamed: list[ConsumerRecord] = []
    copies = 0
    for record in records:
        origin = dlq.first_position(record)
        if origin is None:
            unnamed.append(record)
            continue
        if (kept := latest.get(origin)) is not None:
            copies += 1
            if (kept.timestamp, kept.partition, kept.offset) > (
                record.timestamp,
                record.partition,
                record.offset,
            ):
                continue
        latest[origin] = record
    ordered = sorted(
        latest.items(), key=lambda item: (item[0].topic, item[0].partition, item[0].offset)
    )
    return OnePerOrigin([(record, origin) for origin, record in ordered], copies, unnamed)


@dataclass(frozen=True)
class Replayed:
    """What `dlq replay` published (or would): one record per origin; how many selected dead
    letters were copies of one it replayed; and what it could not: records on the
    dead-letter topic whose headers name no source position (not written by a consumer)."""

    replayed: list[DeadLetterView]
    copies: int
    skipped: list[DeadLetterView]


async def replay_dead_letters(
    settings: Settings, selection: Selection | None = None, *, dry_run: bool = False
) -> Replayed:
    """Publish the selected dead letters' original records to their source topic again (e.g.
    after a fix), one per origin, with `ledger.origin.*` headers naming it.

    Replaying is safe to repeat: the ledger dedupes events, and a record that is still bad
    returns to the dead-letter topic as one more copy of the same origin, which the next
    replay replays once.
    """
    chosen = selection or Selection()
    async with reader(settings) as consumer:
        grouped = one_per_origin(
            [
                record
                async for record in dead_letter_records(
                    settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
                )
                if chosen(record)
            ]
        )
    done = Replayed(
        replayed=[_view(record) for record, _ in grouped.latest],
        copies=grouped.copies,
        skipped=[_view(record) for record in grouped.unnamed],
    )
    for view in done.skipped:
        log.warning(
            "not replayed: the record names no source position",
            extra=fields(partition=view.partition, offset=view.offset),
        )
    if dry_run or not grouped.latest:
        return done
    async with ProducerResource(
        settings.kafka_bootstrap,
        client_id="token-ledger-dlq-replay",
        max_request_size=FETCH_BYTES,
        **settings.kafka_security(),
    ) as producer:
        for record, origin in grouped.latest:
            # Where a consumer last read it: the topic it is consumed from now.
            topic = (dlq.source_position(record) or origin).topic
            await producer.send_and_wait(
                topic, record.value, key=record.key, headers=dlq.replay_headers(record, origin)
            )
    return done
