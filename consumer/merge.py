"""The merge rules: decoded events in, ledger rows out. Pure: no I/O, no clock, no logging.

Every ledger cell is a register won by a total order over the events that touch it, so the
result depends only on the SET of events, never on their order, duplication or batching:

- thread: created_at = min occurred_at, updated_at = max occurred_at, created_by_id = user of
  the earliest (occurred_at, event_id) event that has one. The first search_space_id seen for a
  thread (stored, else earliest in arrival order) binds it; events naming another are rejected.
- message content: the highest (rank, occurred_at, event_id) wins, with rank 0 assistant shell
  (turn.started) < 1 message.appended < 2 turn.started user text and turn.finalized content.
  created_at = earliest occurred_at of any event that touched the row.
- token usage (assistant messages): the highest rank wins (2 turn.finalized > 1
  message.appended); on equal rank the EARLIER (occurred_at, event_id) wins: the first
  finalize's cost is authoritative. A finalize without calls neither creates nor removes usage.

`reduce_batch(events, stored)` folds a batch into one candidate row per key (what the guarded
upserts in store.py write) and compares it with the stored registers to give each event an
outcome and the usage that became authoritative. `rebuild(events)` is the whole ledger from
scratch, which is what `verify` and the property tests compare the database with.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, Self, TypeVar

from producer.events import AnyEvent, MessageAppended, TurnFinalized, TurnStarted

SHELL, LEGACY, SERVER = 0, 1, 2
STATUS_NO_TEXT: list[dict[str, Any]] = [{"type": "status", "text": "(no text response)"}]
SHELL_CONTENT: list[dict[str, Any]] = [{"type": "text", "text": ""}]
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")


class Outcome(StrEnum):
    APPLIED = "applied"  # won at least one register (or created a row)
    DUPLICATE = "duplicate"  # already applied: seen earlier in the batch, or the stored winner
    SUPERSEDED = "superseded"  # lost every register it competes for
    REJECTED = "dead_lettered"  # thread_search_space_mismatch


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


class Claim(NamedTuple):
    """Who holds a register: (rank, occurred_at, event_id)."""

    rank: int
    at: datetime
    event_id: uuid.UUID


def content_beats(new: Claim, old: Claim) -> bool:
    return new > old


def usage_beats(new: Claim, old: Claim) -> bool:
    if new.rank != old.rank:
        return new.rank > old.rank
    return (new.at, new.event_id) < (old.at, old.event_id)


@dataclass(frozen=True)
class ThreadRow:
    id: int
    search_space_id: int
    created_at: datetime
    updated_at: datetime
    created_by_id: uuid.UUID | None = None
    created_by_at: datetime | None = None
    created_by_event_id: uuid.UUID | None = None

    @property
    def creator_claim(self) -> tuple[datetime, uuid.UUID] | None:
        if self.created_by_at is None or self.created_by_event_id is None:
            return None
        return (self.created_by_at, self.created_by_event_id)

    def merge(self, other: ThreadRow) -> ThreadRow:
        mine, theirs = self.creator_claim, other.creator_claim
        creator = other if theirs is not None and (mine is None or theirs < mine) else self
        return replace(
            self,
            created_at=min(self.created_at, other.created_at),
            updated_at=max(self.updated_at, other.updated_at),
            created_by_id=creator.created_by_id,
            created_by_at=creator.created_by_at,
            created_by_event_id=creator.created_by_event_id,
        )


@dataclass(frozen=True)
class MessageRow:
    key: MessageKey
    claim: Claim
    content: list[dict[str, Any]]
    author_id: uuid.UUID | None
    created_at: datetime

    def merge(self, other: MessageRow) -> MessageRow:
        winner = other if content_beats(other.claim, self.claim) else self
        return replace(winner, created_at=min(self.created_at, other.created_at))


@dataclass(frozen=True)
class UsageRow:
    key: MessageKey
    claim: Claim
    source: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    model_breakdown: dict[str, dict[str, int]]
    call_details: dict[str, Any]
    search_space_id: int
    user_id: uuid.UUID | None
    created_at: datetime

    def merge(self, other: UsageRow) -> UsageRow:
        winner = other if usage_beats(other.claim, self.claim) else self
        return replace(winner, created_at=min(self.created_at, other.created_at))


@dataclass(frozen=True)
class StoredMessage:
    """The register of a stored message row (and of its usage row, if any)."""

    claim: Claim
    created_at: datetime
    usage_claim: Claim | None = None
    usage_created_at: datetime | None = None
    usage_breakdown: Mapping[str, Mapping[str, int]] | None = None


@dataclass(frozen=True)
class StoredState:
    threads: Mapping[int, ThreadRow] = field(default_factory=dict)
    messages: Mapping[MessageKey, StoredMessage] = field(default_factory=dict)


@dataclass(frozen=True)
class UsageChange:
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


# -- events -> candidate rows ----------------------------------------------------------------


def _dump(parts: Iterable[Any]) -> list[dict[str, Any]]:
    return [part.model_dump() for part in parts]


def mentioned_documents_part(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    kept = [
        {"id": d["id"], "title": d["title"], "document_type": d["document_type"]}
        for d in documents
        if all(d.get(name) is not None for name in ("id", "title", "document_type"))
    ]
    return {"type": "mentioned-documents", "documents": kept} if kept else None


def _message(
    event: AnyEvent, role: str, rank: int, content: list[dict[str, Any]], key: MessageKey
) -> MessageRow:
    return MessageRow(
        key=key,
        claim=Claim(rank, event.occurred_at, event.event_id),
        content=content,
        author_id=event.user_id if role == "user" else None,
        created_at=event.occurred_at,
    )


def message_keys(event: AnyEvent) -> tuple[MessageKey, ...]:
    """The messages an event touches (a turn.started: user row first, then the shell)."""
    if isinstance(event, TurnStarted):
        return (
            MessageKey(event.thread_id, "user", event.turn_id, None),
            MessageKey(event.thread_id, "assistant", event.turn_id, None),
        )
    if isinstance(event, TurnFinalized):
        return (MessageKey(event.thread_id, "assistant", event.turn_id, None),)
    origin = None if event.turn_id is not None else event.event_id
    return (MessageKey(event.thread_id, event.role, event.turn_id, origin),)


def candidates(event: AnyEvent) -> tuple[list[MessageRow], UsageRow | None]:
    """The message rows an event claims and the usage row it claims, before any merging."""
    keys = message_keys(event)
    if isinstance(event, TurnStarted):
        user_key, assistant_key = keys
        content: list[dict[str, Any]] = [{"type": "text", "text": event.user_query}]
        if part := mentioned_documents_part(event.mentioned_documents):
            content.append(part)
        return [
            _message(event, "user", SERVER, content, user_key),
            _message(event, "assistant", SHELL, SHELL_CONTENT, assistant_key),
        ], None
    if isinstance(event, TurnFinalized):
        (key,) = keys
        message = _message(event, "assistant", SERVER, _dump(event.content) or STATUS_NO_TEXT, key)
        calls = event.usage.calls if event.usage else []
        if not calls:
            return [message], None
        breakdown: dict[str, dict[str, int]] = {}
        for call in calls:
            sums = breakdown.setdefault(call.model, dict.fromkeys(USAGE_FIELDS, 0))
            for name in USAGE_FIELDS:
                sums[name] += getattr(call, name)
        usage = UsageRow(
            key=key,
            claim=Claim(SERVER, event.occurred_at, event.event_id),
            source=event.type,
            **{name: sum(getattr(c, name) for c in calls) for name in USAGE_FIELDS},
            model_breakdown=breakdown,
            call_details={"calls": _dump(calls)},
            search_space_id=event.search_space_id,
            user_id=event.user_id,
            created_at=event.occurred_at,
        )
        return [message], usage
    return _appended_candidates(event, *keys)


def _appended_candidates(
    event: MessageAppended, key: MessageKey
) -> tuple[list[MessageRow], UsageRow | None]:
    message = _message(event, event.role, LEGACY, _dump(event.content), key)
    legacy = event.token_usage
    if legacy is None:
        return [message], None
    usage = UsageRow(
        key=key,
        claim=Claim(LEGACY, event.occurred_at, event.event_id),
        source=event.type,
        prompt_tokens=legacy.prompt_tokens,
        completion_tokens=legacy.completion_tokens,
        total_tokens=legacy.total_tokens,
        cost_micros=legacy.cost_micros,
        model_breakdown={
            model: usage.model_dump() for model, usage in (legacy.usage or {}).items()
        },
        call_details=legacy.call_details_object(),
        search_space_id=event.search_space_id,
        user_id=event.user_id,
        created_at=event.occurred_at,
    )
    return [message], usage


def thread_candidate(event: AnyEvent) -> ThreadRow:
    has_user = event.user_id is not None
    return ThreadRow(
        id=event.thread_id,
        search_space_id=event.search_space_id,
        created_at=event.occurred_at,
        updated_at=event.occurred_at,
        created_by_id=event.user_id,
        created_by_at=event.occurred_at if has_user else None,
        created_by_event_id=event.event_id if has_user else None,
    )


# -- folding ---------------------------------------------------------------------------------


class _Mergeable(Protocol):
    def merge(self, other: Self) -> Self: ...


K = TypeVar("K")
R = TypeVar("R", bound=_Mergeable)


def _fold(rows: dict[K, R], key: K, row: R) -> None:
    current = rows.get(key)
    rows[key] = row if current is None else current.merge(row)


def reduce_batch(events: Sequence[AnyEvent], stored: StoredState) -> BatchPlan:
    """Fold a batch (in arrival order) against the stored registers."""
    spaces = {thread_id: row.search_space_id for thread_id, row in stored.threads.items()}
    threads: dict[int, ThreadRow] = {}
    messages: dict[MessageKey, MessageRow] = {}
    usage: dict[MessageKey, UsageRow] = {}
    decided: list[Outcome | None] = []  # None: accepted, decided once the batch is folded
    seen: set[uuid.UUID] = set()

    for event in events:
        if spaces.setdefault(event.thread_id, event.search_space_id) != event.search_space_id:
            decided.append(Outcome.REJECTED)
            continue
        if event.event_id in seen:
            decided.append(Outcome.DUPLICATE)
            continue
        seen.add(event.event_id)
        decided.append(None)
        _fold(threads, event.thread_id, thread_candidate(event))
        event_messages, event_usage = candidates(event)
        for message in event_messages:
            _fold(messages, message.key, message)
        if event_usage is not None:
            _fold(usage, event_usage.key, event_usage)

    outcomes = _outcomes(events, decided, messages, usage, stored)
    changed_messages = sorted(
        (row for row in messages.values() if _message_changes(row, stored.messages.get(row.key))),
        key=lambda row: row.key.sort_key(),
    )
    changed_usage = sorted(
        (row for row in usage.values() if _usage_changes(row, stored.messages.get(row.key))),
        key=lambda row: row.key.sort_key(),
    )

    return BatchPlan(
        threads=[
            row
            for thread_id, row in sorted(threads.items())
            if _thread_changes(row, stored.threads.get(thread_id))
        ],
        messages=changed_messages,
        usage=changed_usage,
        outcomes=outcomes,
        usage_changes=[
            change
            for row in changed_usage
            if _usage_wins(row, stored.messages.get(row.key))
            for change in _usage_delta(row, stored.messages.get(row.key))
        ],
    )


def _outcomes(
    events: Sequence[AnyEvent],
    decided: list[Outcome | None],
    messages: dict[MessageKey, MessageRow],
    usage: dict[MessageKey, UsageRow],
    stored: StoredState,
) -> list[Outcome]:
    """Applied if the event holds a register it did not hold before; duplicate if it already
    held one (a redelivery); superseded if it lost everywhere."""
    winners = {
        row.claim.event_id
        for row in messages.values()
        if _content_wins(row, stored.messages.get(row.key))
    } | {
        row.claim.event_id
        for row in usage.values()
        if _usage_wins(row, stored.messages.get(row.key))
    }
    stored_winners = {m.claim.event_id for m in stored.messages.values()} | {
        m.usage_claim.event_id for m in stored.messages.values() if m.usage_claim
    }
    outcomes = []
    for event, outcome in zip(events, decided, strict=True):
        if outcome is None:
            if event.event_id in winners:
                outcome = Outcome.APPLIED
            elif event.event_id in stored_winners:
                outcome = Outcome.DUPLICATE
            else:
                outcome = Outcome.SUPERSEDED
        outcomes.append(outcome)
    return outcomes


def _content_wins(row: MessageRow, stored: StoredMessage | None) -> bool:
    return stored is None or content_beats(row.claim, stored.claim)


def _message_changes(row: MessageRow, stored: StoredMessage | None) -> bool:
    return _content_wins(row, stored) or (stored is not None and row.created_at < stored.created_at)


def _usage_wins(row: UsageRow, stored: StoredMessage | None) -> bool:
    return (
        stored is None or stored.usage_claim is None or usage_beats(row.claim, stored.usage_claim)
    )


def _usage_changes(row: UsageRow, stored: StoredMessage | None) -> bool:
    if _usage_wins(row, stored):
        return True
    assert stored is not None and stored.usage_created_at is not None
    return row.created_at < stored.usage_created_at


def _thread_changes(row: ThreadRow, stored: ThreadRow | None) -> bool:
    return stored is None or stored.merge(row) != stored


def _usage_delta(row: UsageRow, stored: StoredMessage | None) -> list[UsageChange]:
    previous = (stored.usage_breakdown if stored else None) or {}
    changes = []
    for model in sorted(set(row.model_breakdown) | set(previous)):
        new, old = row.model_breakdown.get(model, {}), previous.get(model, {})
        delta = {name: int(new.get(name, 0)) - int(old.get(name, 0)) for name in USAGE_FIELDS}
        if any(delta.values()):
            changes.append(UsageChange(model=model, **delta))
    return changes
