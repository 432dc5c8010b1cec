"""Dead letters: the original key and value, byte for byte, with the reason in headers.

`DeadLetterQueue.report(letters)` returns only once the broker has acknowledged every one
(acks=all, idempotent producer), so the caller may move its offsets past them afterwards.
Dead letters are at-least-once: if the transaction that follows is retried, a letter it
already reported is reported again (readers dedupe by the ledger.source.* headers).
Header values are decimal/ASCII strings; `ledger.error.detail` is capped at 1 KiB and built by
the decoder or the error taxonomy, which never quote chat text or secrets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from aiokafka.structs import ConsumerRecord

from consumer.logs import fields
from producer.client import ProducerResource
from producer.events import RejectReason

log = logging.getLogger(__name__)
DETAIL_LIMIT = 1024
# Our own headers plus the original ones must fit beside the largest source record.
HEADER_HEADROOM = 64 * 1024

REASON = "ledger.error.reason"
DETAIL = "ledger.error.detail"
SOURCE_TOPIC = "ledger.source.topic"
SOURCE_PARTITION = "ledger.source.partition"
SOURCE_OFFSET = "ledger.source.offset"
FAILED_AT = "ledger.failed_at"
LEDGER_HEADERS = frozenset(
    (REASON, DETAIL, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET, FAILED_AT)
)


@dataclass(frozen=True)
class DeadLetter:
    record: ConsumerRecord  # [bytes, bytes]; aiokafka ships no type information
    reason: RejectReason
    detail: str


def dead_letter_headers(letter: DeadLetter, failed_at: datetime) -> list[tuple[str, bytes]]:
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
    ]


class DeadLetterQueue(ProducerResource):
    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        max_record_bytes: int,
        **kafka_options: Any,
    ) -> None:
        super().__init__(
            bootstrap_servers,
            client_id="token-ledger-dlq",
            max_request_size=max_record_bytes + HEADER_HEADROOM,
            **kafka_options,
        )
        self.topic = topic

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
        """Publish every dead letter and wait until the broker has acknowledged all of them."""
        if not letters:
            return
        failed_at = datetime.now(UTC)
        pending = [
            await self._producer.send(
                self.topic,
                letter.record.value,
                key=letter.record.key,
                headers=dead_letter_headers(letter, failed_at),
            )
            for letter in letters
        ]
        await asyncio.gather(*pending)
        for letter in letters:
            log.warning(
                "dead-lettered",
                extra=fields(
                    reason=letter.reason.value,
                    detail=letter.detail[:200],
                    partition=letter.record.partition,
                    offset=letter.record.offset,
                ),
            )
