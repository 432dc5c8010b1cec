"""What an event claims: the ledger's keys and rows, the claims that order them, and the
candidate rows of one event before any merging. Pure: no I/O, no clock, no logging.

A claim is (rank, occurred_at, event_id, payload digest): rank 0 assistant shell
(turn.started) < 1 message.appended < 2 turn.started user text and turn.finalized content. The
content register is won by the highest claim (`content_beats`), the usage register by the
highest rank and then the EARLIEST claim (`usage_beats`): the first finalize's cost is
authoritative (docs/contract.md#merge-rules). consumer/ledger/merge.py folds these rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from msgspec import Struct
from msgspec.structs import replace

from producer import canonical, jsonvalues
from producer.events import USAGE_MEASURES, Rejection, attribution
from producer.ledger_event import LedgerEvent

SHELL, LEGACY, SERVER = 0, 1, 2
# The assistant message a turn.started opens, until its finalize: one empty text part.
SHELL_CONTENT = canonical.text([{"type": "text", "text": ""}])


class Outcome(StrEnum):
    APPLIED = "applied"  # won at least one register (or created a row)
    DUPLICATE = "duplicate"  # already applied: seen earlier in the batch, or the stored winner
    SUPERSEDED = "superseded"  # lost every register it competes for
    REJECTED = "dead_lettered"  # thread_search_space_mismatch, event_id_conflict


class MessageKey(NamedTuple):
    """A message's identity: (thread, turn, role), or the creating event when turn_id is null."""

    thread_id: int
    role: str
    turn_id: str | None
    origin_event_id: uuid.UUID | None

    def sort_key(self) -> tuple[int, int, str, str, str]:
        # Turn-less rows sort after turn rows of the same thread; all keys are comparable.
        if self.turn_id is not None:
            return (self.thread_id, 0, self.turn_id, self.role, "")
        return (self.thread_id, 1, "", self.role, str(self.origin_event_id))


# One copy of an event, (event_id, occurred_at, digest): equal for exact copies, different for
# differing copies. A plain tuple: the merge builds one per event and per stored claim.
Copy = tuple[uuid.UUID, datetime, bytes]


class Claim(NamedTuple):
    """Who holds a register: (rank, occurred_at, event_id, payload digest)."""

    rank: int
    at: datetime
    event_id: uuid.UUID
    digest: bytes

    @property
    def copy(self) -> Copy:
        return (self.event_id, self.at, self.digest)


def content_beats(new: Claim, old: Claim) -> bool:
    return new > old


def usage_beats(new: Claim, old: Claim) -> bool:
    if new.rank != old.rank:
        return new.rank > old.rank
    return (new.at, new.event_id, new.digest) < (old.at, old.event_id, old.digest)


class ThreadRow(Struct, frozen=True, gc=False):
    id: int
    search_space_id: int
    created_at: datetime
    updated_at: datetime
    created_by_id: uuid.UUID | None = None
    created_by_at: datetime | None = None
    created_by_event_id: uuid.UUID | None = None
    created_by_digest: bytes | None = None

    @property
    def creator_claim(self) -> tuple[datetime, uuid.UUID, bytes] | None:
        if (
            self.created_by_at is None
            or self.created_by_event_id is None
            or self.created_by_digest is None
        ):
            return None
        return (self.created_by_at, self.created_by_event_id, self.created_by_digest)

    def merge(self, other: ThreadRow) -> ThreadRow:
        mine, theirs = self.creator_claim, other.creator_claim
        creator = other if theirs is not None and (mine is None or theirs < mine) else self
        # Positional, not replace(): this runs once per event of a batch.
        return ThreadRow(
            self.id,
            self.search_space_id,
            min(self.created_at, other.created_at),
            max(self.updated_at, other.updated_at),
            creator.created_by_id,
            creator.created_by_at,
            creator.created_by_event_id,
            creator.created_by_digest,
        )


class MessageRow(Struct, frozen=True, gc=False):
    key: MessageKey
    claim: Claim
    content: str  # JSON text
    author_id: uuid.UUID | None
    created_at: datetime

    def merge(self, other: MessageRow) -> MessageRow:
        winner, loser = (other, self) if content_beats(other.claim, self.claim) else (self, other)
        if winner.created_at <= loser.created_at:
            return winner
        return replace(winner, created_at=loser.created_at)


class UsageRow(Struct, frozen=True, gc=False):
    key: MessageKey
    claim: Claim
    source: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    model_breakdown: dict[str, dict[str, Any]]  # legacy: as sent (measures may be missing)
    call_details: str  # JSON text
    search_space_id: int
    user_id: uuid.UUID | None
    created_at: datetime

    def merge(self, other: UsageRow) -> UsageRow:
        winner, loser = (other, self) if usage_beats(other.claim, self.claim) else (self, other)
        if winner.created_at <= loser.created_at:
            return winner
        return replace(winner, created_at=loser.created_at)


class StoredMessage(Struct, frozen=True, gc=False):
    """The register of a stored message row (and of its usage row, if any). Its usage's
    per-model attribution is worked out only for a usage that a batch supersedes, from the
    stored totals and breakdown (JSON text): a redelivery never parses it."""

    claim: Claim
    created_at: datetime
    usage_claim: Claim | None = None
    usage_created_at: datetime | None = None
    usage_totals: Mapping[str, int] | None = None
    usage_breakdown: str | None = None

    def usage_attribution(self) -> dict[str, dict[str, int]]:
        if self.usage_totals is None or self.usage_breakdown is None:
            return {}
        return attribution(self.usage_totals, jsonvalues.loads(self.usage_breakdown))


@dataclass(frozen=True)
class StoredState:
    threads: Mapping[int, ThreadRow] = field(default_factory=dict)
    messages: Mapping[MessageKey, StoredMessage] = field(default_factory=dict)


class UsageChange(Struct, frozen=True, gc=False):
    """A usage register that became authoritative: per model, new minus previous sums."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int


@dataclass
class BatchPlan:
    threads: list[ThreadRow]  # sorted by id; only rows that change
    messages: list[MessageRow]  # sorted by key; only rows that change
    usage: list[UsageRow]  # sorted by key; only rows that change
    outcomes: list[Outcome]  # one per input event, same order
    usage_changes: list[UsageChange]
    rejections: dict[int, Rejection] = field(default_factory=dict)  # input index -> why


def usage_totals(row: UsageRow) -> dict[str, int]:
    return {name: getattr(row, name) for name in USAGE_MEASURES}


# -- events -> candidate rows ----------------------------------------------------------------


def _claim(event: LedgerEvent, rank: int) -> Claim:
    return Claim(rank, event.occurred_at, event.event_id, event.digest)


def message_keys(event: LedgerEvent) -> tuple[MessageKey, ...]:
    """The messages an event touches (a turn.started: user row first, then the shell)."""
    if event.type == "turn.started":
        return (
            MessageKey(event.thread_id, "user", event.turn_id, None),
            MessageKey(event.thread_id, "assistant", event.turn_id, None),
        )
    if event.type == "turn.finalized":
        return (MessageKey(event.thread_id, "assistant", event.turn_id, None),)
    origin = None if event.turn_id is not None else event.event_id
    assert event.role is not None  # message.appended
    return (MessageKey(event.thread_id, event.role, event.turn_id, origin),)


def turnless_key(event: LedgerEvent) -> MessageKey | None:
    """The key of the turn-less message an event creates (keyed by its event_id), if any:
    only a message.appended without a turn_id has one."""
    if event.turn_id is not None or event.type != "message.appended":
        return None
    assert event.role is not None  # message.appended
    return MessageKey(event.thread_id, event.role, None, event.event_id)


def candidates(event: LedgerEvent) -> tuple[list[MessageRow], UsageRow | None]:
    """The message rows an event claims and the usage row it claims, before any merging: what
    the event stores (producer/ledger_event.py), under its keys and claims."""
    keys = message_keys(event)
    if event.type == "turn.started":
        user_key, assistant_key = keys
        return [
            MessageRow(
                user_key, _claim(event, SERVER), event.content, event.user_id, event.occurred_at
            ),
            MessageRow(assistant_key, _claim(event, SHELL), SHELL_CONTENT, None, event.occurred_at),
        ], None
    (key,) = keys
    if event.type == "turn.finalized":
        claim, author = _claim(event, SERVER), None
    else:
        claim = _claim(event, LEGACY)
        author = event.user_id if event.role == "user" else None
    message = MessageRow(key, claim, event.content, author, event.occurred_at)
    usage = event.usage
    if usage is None:
        return [message], None
    return [message], UsageRow(
        key,
        claim,
        event.type,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cost_micros,
        usage.model_breakdown,
        usage.call_details,
        event.search_space_id,
        event.user_id,
        event.occurred_at,
    )


# An event's candidate rows: its thread, its messages, its usage (if any).
EventRows = tuple[ThreadRow, list[MessageRow], UsageRow | None]


def event_rows(event: LedgerEvent) -> EventRows:
    """Everything an event claims, built from the event alone: the consumer builds it while
    decoding, beside the transaction in flight, not inside its own."""
    messages, usage = candidates(event)
    return thread_candidate(event), messages, usage


def thread_candidate(event: LedgerEvent) -> ThreadRow:
    if event.user_id is None:
        return ThreadRow(
            event.thread_id, event.search_space_id, event.occurred_at, event.occurred_at
        )
    return ThreadRow(
        event.thread_id,
        event.search_space_id,
        event.occurred_at,
        event.occurred_at,
        event.user_id,
        event.occurred_at,
        event.event_id,
        event.digest,
    )
