"""Dead letters: the original key and value, byte for byte, with the reason in headers.

`DeadLetterQueue.report(letters)` returns only once the broker has acknowledged every one
(acks=all, idempotent producer), so the caller may move its offsets past them afterwards.
Dead letters are at-least-once: if the transaction that reports them is retried, a letter it
already reported is reported again (readers dedupe by the ledger.source.* headers). Each names
the consumer group that sent it (`ledger.consumer.group`). A record `dlq replay` published again
carries `ledger.origin.*`, the position of the first record it copies; a dead letter keeps
those, so every copy of one source record can be traced to it (docs/operations.md#dead-letters).
A record that reached us compressed can be far larger once decoded (a 5 MiB value of
repeated text is a few hundred bytes with zstd), so the producer compresses too and takes any
size: only the topic's own limit (on the compressed batch) can refuse one. A refusal that a
retry cannot cure (too large, not authorised) is DeadLetterRefusedError: the caller stops the
partitions concerned; anything retriable is DeadLetterUnavailableError (retry the batch).
Header values are decimal/ASCII strings; `ledger.error.detail` is capped at 1 KiB and built by
the decoder or the error taxonomy, which never quote chat text or secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import ConsumerRecord

from consumer.errors import DeadLetterRefusedError, DeadLetterUnavailableError
from consumer.logs import fields
from producer.batches import BATCH_BYTES
from producer.client import ProducerResource
from producer.events import RejectReason

log = logging.getLogger(__name__)
DETAIL_LIMIT = 1024
# Our own headers plus the original ones must fit beside the largest source record.
HEADER_HEADROOM = 64 * 1024
# aiokafka checks a record's UNcompressed size against max_request_size before sending; the
# broker checks the compressed batch against the topic. Let the broker decide.
MAX_UNCOMPRESSED_BYTES = 2**31 - 1
# What the broker (or the client, for its own size check) answers that no retry can change.
# aiokafka's `retriable` flag is too coarse for this: a plain timeout is not retriable there.
REFUSALS = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
)

REASON = "ledger.error.reason"
DETAIL = "ledger.error.detail"
SOURCE_TOPIC = "ledger.source.topic"
SOURCE_PARTITION = "ledger.source.partition"
SOURCE_OFFSET = "ledger.source.offset"
FAILED_AT = "ledger.failed_at"
GROUP = "ledger.consumer.group"
# Replaced on every trip through the consumer: they describe this dead letter only.
LEDGER_HEADERS = frozenset(
    (REASON, DETAIL, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET, FAILED_AT, GROUP)
)
ORIGIN_TOPIC = "ledger.origin.topic"
ORIGIN_PARTITION = "ledger.origin.partition"
ORIGIN_OFFSET = "ledger.origin.offset"
# Kept on every trip: where the first copy of a replayed record was read.
ORIGIN_HEADERS = frozenset((ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET))


@dataclass(frozen=True)
class SourcePosition:
    topic: str
    partition: int
    offset: int


def source_position(record: ConsumerRecord) -> SourcePosition | None:
    """Where a dead letter's original record stood, from its headers; None if they do not say
    (a record another writer put on the dead-letter topic, or headers with null values)."""
    return _position(record, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET)


def origin_position(record: ConsumerRecord) -> SourcePosition | None:
    """The first position of a record `dlq replay` published again, from its `ledger.origin.*`
    headers; None if it was never replayed (or they do not say)."""
    return _position(record, ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET)


def first_position(record: ConsumerRecord) -> SourcePosition | None:
    """The source record a dead letter stands for: its origin if it is a replayed copy, else
    where it was read."""
    return origin_position(record) or source_position(record)


def _position(
    record: ConsumerRecord, topic: str, partition: str, offset: str
) -> SourcePosition | None:
    headers = dict(record.headers or ())
    try:
        position = SourcePosition(
            (headers.get(topic) or b"").decode(),
            int(headers.get(partition) or b""),
            int(headers.get(offset) or b""),
        )
    except ValueError:  # missing, null or not a number (UnicodeDecodeError is a ValueError)
        return None
    return position if position.topic else None


def replay_headers(record: ConsumerRecord, origin: SourcePosition) -> list[tuple[str, bytes]]:
    """A dead letter's original headers, for its record published again, with `origin` (its
    first position) in place of any ledger.* header."""
    original = [
        (k, v)
        for k, v in (record.headers or ())
        if k not in LEDGER_HEADERS and k not in ORIGIN_HEADERS
    ]
    return [
        *original,
        (ORIGIN_TOPIC, origin.topic.encode()),
        (ORIGIN_PARTITION, str(origin.partition).encode()),
        (ORIGIN_OFFSET, str(origin.offset).encode()),
    ]


@dataclass(frozen=True)
class DeadLetter:
    record: ConsumerRecord  # [bytes, bytes]; aiokafka ships no type information
    reason: RejectReason
    detail: str
    event_type: str | None = None  # for metrics: the type the record names, if one of ours


def dead_letter_headers(
    letter: DeadLetter, failed_at: datetime, group_id: str
) -> list[tuple[str, bytes]]:
    record = letter.record
    detail = letter.detail.encode()[:DETAIL_LIMIT].decode(errors="ignore")
    original = [(k, v) for k, v in (record.headers or ()) if k not in LEDGER_HEADERS]
    return [
        *original,
        (REASON, letter.reason.value.encode()),
        (DETAIL, detail.encode()),
        (SOURCE_TOPIC, record.topic.encode()),
        (SOURCE_PARTITION, str(record.partition).encode()),
        (SOURCE_OFFSET, str(record.offset).encode()),
        (FAILED_AT, failed_at.isoformat(timespec="milliseconds").encode()),
        (GROUP, group_id.encode()),
    ]


class DeadLetterQueue(ProducerResource):
    def __init__(
        self, bootstrap_servers: str, topic: str, *, group_id: str, **kafka_options: Any
    ) -> None:
        """`group_id`: the consumer group the dead letters are sent for (a header of each)."""
        super().__init__(
            bootstrap_servers,
            client_id="token-ledger-dlq",
            max_request_size=MAX_UNCOMPRESSED_BYTES,
            compression_type="zstd",
            max_batch_size=BATCH_BYTES,
            **kafka_options,
        )
        self.topic = topic
        self.group_id = group_id

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        try:
            # Learn the topic's leaders now, not while the first dead letter holds a batch open.
            await self._producer.partitions_for(self.topic)
        except BaseException:
            await self.close()  # __aexit__ is not called when __aenter__ fails
            raise
        return self

    async def report(self, letters: Sequence[DeadLetter]) -> None:
        """Publish every dead letter and wait until the broker has acknowledged all of them
        (sent together, acknowledged together: one batch of the producer, not one round trip
        per letter)."""
        if not letters:
            return
        failed_at = datetime.now(UTC)
        outcomes = await self.send_all(
            self.topic,
            [
                (
                    letter.record.key,
                    letter.record.value,
                    dead_letter_headers(letter, failed_at, self.group_id),
                )
                for letter in letters
            ],
        )
        refused = sorted(
            {
                letter.record.partition
                for letter, outcome in zip(letters, outcomes, strict=True)
                if isinstance(outcome, REFUSALS)
            }
        )
        errors = [outcome for outcome in outcomes if outcome is not None]
        if refused:
            names = sorted({type(e).__name__ for e in errors if isinstance(e, REFUSALS)})
            raise DeadLetterRefusedError(refused, ", ".join(names))
        if errors:
            if not all(isinstance(error, KafkaError) for error in errors):
                raise errors[0]
            raise DeadLetterUnavailableError(f"dead-letter topic: {type(errors[0]).__name__}")
        log_dead_lettered(letters)


# Positions named in a `dead-lettered` line; the rest are counted (the topic has them all).
LOGGED_POSITIONS = 20


def log_dead_lettered(letters: Sequence[DeadLetter]) -> None:
    """One line per reason and batch, not per record: a producer sending garbage at the rate
    of the topic makes as many lines as batches, and logging each record cost a poison backlog
    ~6 % of its drain (docs/operations.md#logs)."""
    by_reason: dict[RejectReason, list[DeadLetter]] = {}
    for letter in letters:
        by_reason.setdefault(letter.reason, []).append(letter)
    for reason, sent in sorted(by_reason.items()):
        log.warning(
            "dead-lettered",
            extra=fields(
                reason=reason.value,
                records=len(sent),
                positions=[
                    f"{letter.record.partition}:{letter.record.offset}"
                    for letter in sent[:LOGGED_POSITIONS]
                ],
                detail=sent[0].detail[:200],
            ),
        )
