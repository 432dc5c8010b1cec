"""An event as the ledger sees it (docs/contract.md#identity): its envelope, its payload and
the payload's digest. This is what the merge rules (consumer/ledger/merge.py) fold.

The payload is the validated event as a JSON value, with only the fields the record set
(`model_dump(exclude_unset=True)` of the event models, producer/events.py): what the ledger
stores, so that copies which would store differently never share a digest. The digest is
SHA-256 of the payload as sorted, ASCII-only compact JSON, the form every release has stored.
Both decode paths produce a LedgerEvent: the consumer's native one (consumer/ledger/native.py)
straight from the bytes, the reference one from the models (`ledger_event`); a property holds
them equal.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec

from producer import canonical
from producer.events import AnyEvent


class LedgerEvent(msgspec.Struct, frozen=True, gc=False):
    type: str
    event_id: uuid.UUID
    occurred_at: datetime  # in UTC (in the payload as its isoformat() text)
    thread_id: int
    search_space_id: int
    user_id: uuid.UUID | None
    turn_id: str | None
    role: str | None  # message.appended only
    digest: bytes
    payload: dict[str, Any]

    @property
    def copy_key(self) -> tuple[uuid.UUID, datetime, bytes]:
        """Equal for exact copies of one event, different for differing copies."""
        return (self.event_id, self.occurred_at, self.digest)


def payload_digest(payload: Mapping[str, Any]) -> bytes:
    """SHA-256 of the payload's canonical text."""
    return hashlib.sha256(canonical.ascii_text(payload)).digest()


def from_payload(payload: dict[str, Any], occurred_at: datetime) -> LedgerEvent:
    """The LedgerEvent of a validated event's payload (`occurred_at` in it as its isoformat()
    text, and here as the UTC datetime): both decode paths end here."""
    return LedgerEvent(
        payload["type"],
        payload["event_id"],
        occurred_at,
        payload["thread_id"],
        payload["search_space_id"],
        payload["user_id"],
        payload.get("turn_id"),
        payload.get("role"),
        payload_digest(payload),
        payload,
    )


def ledger_event(event: AnyEvent) -> LedgerEvent:
    """The reference path: a validated model's LedgerEvent."""
    payload = event.model_dump(exclude_unset=True)
    payload["occurred_at"] = event.occurred_at.isoformat()
    return from_payload(payload, event.occurred_at)
