"""An event as the ledger sees it (docs/contract.md#identity): its envelope, the digest of its
payload, and what its rows store (the content of its message and its usage). This is what the
merge rules (consumer/ledger/merge.py) fold.

The payload is the validated event as a JSON value, with only the fields the record set
(`model_dump(exclude_unset=True)` of the event models, producer/events.py): what the ledger
stores, so that copies which would store differently never share a digest. The digest is
SHA-256 of the payload as sorted, ASCII-only compact JSON, the form every release has stored.
The payload itself is not kept: `stored_content` and `stored_usage` take from it what the rows
store, JSON text where a row stores JSON (written once, here, not again for each statement).
Both decode paths produce a LedgerEvent: the consumer's native one (consumer/ledger/native.py)
straight from the bytes, the reference one from the models (`ledger_event`); a property holds
them equal.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

from producer import canonical
from producer.events import TOKEN_KINDS, USAGE_MEASURES, AnyEvent

# The content of a turn.finalized without any: a status part, so the message reads as one.
STATUS_NO_TEXT = canonical.text([{"type": "status", "text": "(no text response)"}])


class StoredUsage(msgspec.Struct, frozen=True, gc=False):
    """The usage row an event claims: its totals, its breakdown by model (a turn's summed from
    its calls; a legacy message's as sent, whose measures may be missing) and its call details
    as JSON text."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    model_breakdown: dict[str, dict[str, Any]]
    call_details: str


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
    content: str  # JSON text: its message's content (a turn.started's: its user message's)
    usage: StoredUsage | None

    @property
    def copy_key(self) -> tuple[uuid.UUID, datetime, bytes]:
        """Equal for exact copies of one event, different for differing copies."""
        return (self.event_id, self.occurred_at, self.digest)


def payload_digest(payload: Mapping[str, Any]) -> bytes:
    """SHA-256 of the payload's canonical text."""
    return hashlib.sha256(canonical.ascii_text(payload)).digest()


def from_payload(payload: dict[str, Any], occurred_at: datetime) -> LedgerEvent:
    """The LedgerEvent of a validated event's payload (`occurred_at` in it as its isoformat()
    text, and here as the UTC datetime)."""
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
        stored_content(payload),
        stored_usage(payload),
    )


def ledger_event(event: AnyEvent) -> LedgerEvent:
    """The reference path: a validated model's LedgerEvent."""
    payload = event.model_dump(exclude_unset=True)
    payload["occurred_at"] = event.occurred_at.isoformat()
    return from_payload(payload, event.occurred_at)


def stored_content(payload: Mapping[str, Any]) -> str:
    """The JSON text of the content an event's message stores: a turn.started's user message
    is its query as a text part, then the mentioned documents that have all three of their
    fields; a turn.finalized without content stores a status part."""
    if payload["type"] == "turn.started":
        content: list[dict[str, Any]] = [{"type": "text", "text": payload["user_query"]}]
        if part := _mentioned_documents(payload.get("mentioned_documents", ())):
            content.append(part)
        return canonical.text(content)
    if payload["type"] == "turn.finalized" and not payload["content"]:
        return STATUS_NO_TEXT
    return canonical.text(payload["content"])


def _mentioned_documents(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    kept = [
        {"id": d["id"], "title": d["title"], "document_type": d["document_type"]}
        for d in documents
        if all(d.get(name) is not None for name in ("id", "title", "document_type"))
    ]
    return {"type": "mentioned-documents", "documents": kept} if kept else None


def stored_usage(payload: Mapping[str, Any]) -> StoredUsage | None:
    """The usage row an event claims, if any. A turn.finalized's calls are summed per model (a
    finalize without calls claims none); a message.appended's token_usage is kept as sent,
    its call details as {"calls": [...]} when they are a bare list or absent."""
    if payload["type"] == "turn.finalized":
        usage = payload.get("usage")
        calls = usage["calls"] if usage else ()
        return _turn_usage(calls) if calls else None
    legacy = payload.get("token_usage") if payload["type"] == "message.appended" else None
    if legacy is None:
        return None
    details = legacy.get("call_details")
    return StoredUsage(
        legacy["prompt_tokens"],
        legacy["completion_tokens"],
        legacy["total_tokens"],
        legacy["cost_micros"],
        model_breakdown=legacy.get("usage") or {},
        call_details=canonical.text(
            {"calls": []}
            if details is None
            else {"calls": details}
            if isinstance(details, list)
            else details
        ),
    )


def _turn_usage(calls: Sequence[Mapping[str, Any]]) -> StoredUsage:
    breakdown: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(USAGE_MEASURES, 0)
    for call in calls:
        sums = breakdown.setdefault(call["model"], dict.fromkeys(USAGE_MEASURES, 0))
        for name in USAGE_MEASURES:
            sums[name] += call[name]
            totals[name] += call[name]
        for kind in TOKEN_KINDS:  # only where reported: absent is not zero
            if (value := call.get(kind)) is not None:
                sums[kind] = sums.get(kind, 0) + value
    return StoredUsage(
        totals["prompt_tokens"],
        totals["completion_tokens"],
        totals["total_tokens"],
        totals["cost_micros"],
        model_breakdown=breakdown,
        call_details=canonical.text({"calls": calls}),
    )
