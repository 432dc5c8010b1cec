"""`token-ledger dlq list|replay`: the dead-letter topic as rows, and its records published to
their source topic again, once per source record (docs/operations.md#dead-letters)."""

from __future__ import annotations

import hashlib
import logging
import math
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
    # Up: a bound between two milliseconds lies after the earlier one (Kafka's resolution).
    return math.ceil(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Listed:
    views: list[DeadLetterView]
    matched: int  # before --limit


async def list_dead_letters(
    settings: Settings, selection: Selection | None = None, *, limit: int | None = None
) -> Listed:
    """The selected dead letters in the topic's order (partition, offset); the first `limit`."""
    chosen = selection or Selection()
    async with reader(settings) as consumer:
        views = [
            _view(record)
            async for record in dead_letter_records(
                settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
            )
            if chosen(record)
        ]
    # Fetches interleave partitions in no fixed order: the topic's order is sorted here.
    views.sort(key=lambda view: (view.partition, view.offset))
    return Listed(views if limit is None else views[:limit], len(views))


@dataclass(frozen=True)
class OnePerOrigin:
    """Dead letters grouped by the source record they stand for: the latest of each, with its
    origin; the copies it stands for; those naming no position."""

    latest: list[tuple[ConsumerRecord, dlq.SourcePosition]]
    copies: int
    unnamed: list[ConsumerRecord]


# A source record: where it first stood, and its value's SHA-256. The value tells apart two
# records that stood at one position (a recreated topic) and makes a header that names a
# position (a producer may set any header) merge nothing but byte-identical copies.
Origin = tuple[dlq.SourcePosition, bytes]


class OriginGroups:
    """The latest dead letter of each source record, kept while the topic is read: memory
    grows with the source records, not with the copies that replays of still-bad ones add."""

    def __init__(self) -> None:
        self.latest: dict[Origin, tuple[ConsumerRecord, dlq.SourcePosition]] = {}
        self.unnamed: list[ConsumerRecord] = []
        self.copies = 0

    def add(self, record: ConsumerRecord) -> None:
        position = dlq.first_position(record)
        if position is None:
            self.unnamed.append(record)
            return
        origin = (position, hashlib.sha256(record.value or b"").digest())
        if (kept := self.latest.get(origin)) is not None:
            self.copies += 1
            before = kept[0]
            if (before.timestamp, before.partition, before.offset) > (
                record.timestamp,
                record.partition,
                record.offset,
            ):
                return
        self.latest[origin] = (record, position)

    def result(self) -> OnePerOrigin:
        """In the origins' order: replayed, they reach the source topic in the order they
        first had."""
        ordered = sorted(
            self.latest.items(),
            key=lambda item: (
                item[0][0].topic,
                item[0][0].partition,
                item[0][0].offset,
                item[0][1],
            ),
        )
        return OnePerOrigin([kept for _, kept in ordered], self.copies, self.unnamed)


def one_per_origin(records: Iterable[ConsumerRecord]) -> OnePerOrigin:
    """The latest dead letter of each source record (by record timestamp, then topic
    position)."""
    groups = OriginGroups()
    for record in records:
        groups.add(record)
    return groups.result()


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
    groups = OriginGroups()
    async with reader(settings) as consumer:
        async for record in dead_letter_records(
            settings, consumer, settings.dlq_topic, variable="LEDGER_DLQ_TOPIC"
        ):
            if chosen(record):
                groups.add(record)
    grouped = groups.result()
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
