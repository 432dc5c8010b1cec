"""The merge rules: decoded events in, ledger rows out. Pure: no I/O, no clock, no logging.

Every ledger cell is a register won by a total order over the events that touch it, so the
result depends only on the SET of events, never on their order, duplication or batching:

- thread: created_at = min occurred_at, updated_at = max occurred_at, created_by_id = user of
  the earliest (occurred_at, event_id) event that has one. The first search_space_id seen for a
  thread (stored, else earliest in arrival order) binds it; events naming another are rejected.
- message content: the highest (rank, occurred_at, event_id, digest) wins, with rank 0 assistant shell
  (turn.started) < 1 message.appended < 2 turn.started user text and turn.finalized content.
  created_at = earliest occurred_at of any event that touched the row.
- token usage (assistant messages): the highest rank wins (2 turn.finalized > 1
  message.appended); on equal rank the EARLIER (occurred_at, event_id, digest) wins: the first
  finalize's cost is authoritative. A finalize without calls neither creates nor removes usage.

Identity (SPEC section 3): only an exact copy (same event_id, occurred_at and payload digest)
is a duplicate. Differing copies of one event_id all take part in the registers, ordered by
their digest last. The one case that would need two rows for one event_id (a turn-less message
in another thread or role) rejects the later arrival as `event_id_conflict`; with the search
space rule it is the only place where arrival order decides.

`reduce_batch(events, stored)` folds a batch into one candidate row per key (what the guarded
upserts in store.py write) and compares it with the stored registers to give each event an
outcome and the usage that became authoritative. `rebuild(events)` is the whole ledger from
scratch, which is what `verify` and the property tests compare the database with.

Usage is counted per model by `attribution`: the breakdown's numbers, plus the part of the
row's totals that the breakdown does not cover under `(unattributed)`, so the per-model figures
always add up to the row (legacy breakdowns may be missing, partial or inconsistent).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, Self, TypeVar

from producer.events import (
    TOKEN_KINDS,
    USAGE_MEASURES,
    AnyEvent,
    MessageAppended,
    Rejection,
    RejectReason,
    TurnFinalized,
    TurnStarted,
    attribution,
    payload,
    payload_digest,
)

SHELL, LEGACY, SERVER = 0, 1, 2
STATUS_NO_TEXT: list[dict[str, Any]] = [{"type": "status", "text": "(no text response)"}]
SHELL_CONTENT: list[dict[str, Any]] = [{"type": "text", "text": ""}]
USAGE_FIELDS = USAGE_MEASURES


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


class Copy(NamedTuple):
    """One copy of an event: equal for exact copies, different for differing copies."""

    event_id: uuid.UUID
    at: datetime
    digest: bytes


class Claim(NamedTuple):
    """Who holds a register: (rank, occurred_at, event_id, payload digest)."""

    rank: int
    at: datetime
    event_id: uuid.UUID
    digest: bytes

    @property
    def copy(self) -> Copy:
        return Copy(self.event_id, self.at, self.digest)


def content_beats(new: Claim, old: Claim) -> bool:
    return new > old


def usage_beats(new: Claim, old: Claim) -> bool:
    if new.rank != old.rank:
        return new.rank > old.rank
    return (new.at, new.event_id, new.digest) < (old.at, old.event_id, old.digest)


@dataclass(frozen=True)
class ThreadRow:
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
        # Positional, not dataclasses.replace: this runs once per event of a batch.
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


@dataclass(frozen=True)
class MessageRow:
    key: MessageKey
    claim: Claim
    content: list[dict[str, Any]]
    author_id: uuid.UUID | None
    created_at: datetime

    def merge(self, other: MessageRow) -> MessageRow:
        winner, loser = (other, self) if content_beats(other.claim, self.claim) else (self, other)
        if winner.created_at <= loser.created_at:
            return winner
        return replace(winner, created_at=loser.created_at)


@dataclass(frozen=True)
class UsageRow:
    key: MessageKey
    claim: Claim
    source: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    model_breakdown: dict[str, dict[str, Any]]  # legacy: as sent (measures may be missing)
    call_details: dict[str, Any]
    search_space_id: int
    user_id: uuid.UUID | None
    created_at: datetime

    def merge(self, other: UsageRow) -> UsageRow:
        winner, loser = (other, self) if usage_beats(other.claim, self.claim) else (self, other)
        if winner.created_at <= loser.created_at:
            return winner
        return replace(winner, created_at=loser.created_at)


@dataclass(frozen=True)
class StoredMessage:
    """The register of a stored message row (and of its usage row, if any)."""

    claim: Claim
    created_at: datetime
    usage_claim: Claim | None = None
    usage_created_at: datetime | None = None
    usage_attribution: Mapping[str, Mapping[str, int]] | None = None


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
    rejections: dict[int, Rejection] = field(default_factory=dict)  # input index -> why


def usage_totals(row: UsageRow) -> dict[str, int]:
    return {name: getattr(row, name) for name in USAGE_FIELDS}


# -- events -> candidate rows ----------------------------------------------------------------


def _claim(event: AnyEvent, rank: int, digest: bytes) -> Claim:
    return Claim(rank, event.occurred_at, event.event_id, digest)


def mentioned_documents_part(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    kept = [
        {"id": d["id"], "title": d["title"], "document_type": d["document_type"]}
        for d in documents
        if all(d.get(name) is not None for name in ("id", "title", "document_type"))
    ]
    return {"type": "mentioned-documents", "documents": kept} if kept else None


def _message(
    event: AnyEvent,
    role: str,
    claim: Claim,
    content: list[dict[str, Any]],
    key: MessageKey,
) -> MessageRow:
    return MessageRow(
        key=key,
        claim=claim,
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


def candidates(
    event: AnyEvent, digest: bytes | None = None, dumped: Mapping[str, Any] | None = None
) -> tuple[list[MessageRow], UsageRow | None]:
    """The message rows an event claims and the usage row it claims, before any merging.
    `dumped`: the event's `payload`, when the caller has it (its parts are what rows store)."""
    if dumped is None:
        dumped = payload(event)
    if digest is None:
        digest = payload_digest(event, dumped)
    keys = message_keys(event)
    if isinstance(event, TurnStarted):
        user_key, assistant_key = keys
        content: list[dict[str, Any]] = [{"type": "text", "text": event.user_query}]
        if part := mentioned_documents_part(event.mentioned_documents):
            content.append(part)
        return [
            _message(event, "user", _claim(event, SERVER, digest), content, user_key),
            _message(
                event, "assistant", _claim(event, SHELL, digest), SHELL_CONTENT, assistant_key
            ),
        ], None
    if isinstance(event, TurnFinalized):
        (key,) = keys
        claim = _claim(event, SERVER, digest)
        message = _message(event, "assistant", claim, dumped["content"] or STATUS_NO_TEXT, key)
        calls = event.usage.calls if event.usage else []
        if not calls:
            return [message], None
        breakdown: dict[str, dict[str, int]] = {}
        for call in calls:
            sums = breakdown.setdefault(call.model, dict.fromkeys(USAGE_FIELDS, 0))
            for name in USAGE_FIELDS:
                sums[name] += getattr(call, name)
            for kind in TOKEN_KINDS:  # only where reported: absent is not zero
                if (value := getattr(call, kind)) is not None:
                    sums[kind] = sums.get(kind, 0) + value
        usage = UsageRow(
            key=key,
            claim=claim,
            source=event.type,
            **{name: sum(getattr(c, name) for c in calls) for name in USAGE_FIELDS},
            model_breakdown=breakdown,
            # As sent (exclude_unset): a token kind the call did not report stays absent.
            call_details={"calls": dumped["usage"]["calls"]},
            search_space_id=event.search_space_id,
            user_id=event.user_id,
            created_at=event.occurred_at,
        )
        return [message], usage
    return _appended_candidates(event, digest, dumped, *keys)


def _appended_candidates(
    event: MessageAppended, digest: bytes, dumped: Mapping[str, Any], key: MessageKey
) -> tuple[list[MessageRow], UsageRow | None]:
    claim = _claim(event, LEGACY, digest)
    message = _message(event, event.role, claim, dumped["content"], key)
    legacy = event.token_usage
    if legacy is None:
        return [message], None
    usage = UsageRow(
        key=key,
        claim=claim,
        source=event.type,
        prompt_tokens=legacy.prompt_tokens,
        completion_tokens=legacy.completion_tokens,
        total_tokens=legacy.total_tokens,
        cost_micros=legacy.cost_micros,
        # As sent (exclude_unset): a legacy entry may carry any subset of the measures.
        model_breakdown=dumped["token_usage"].get("usage") or {},
        call_details=legacy.call_details_object(),
        search_space_id=event.search_space_id,
        user_id=event.user_id,
        created_at=event.occurred_at,
    )
    return [message], usage


def thread_candidate(event: AnyEvent, digest: bytes | None = None) -> ThreadRow:
    has_user = event.user_id is not None
    if digest is None:
        digest = payload_digest(event)
    return ThreadRow(
        id=event.thread_id,
        search_space_id=event.search_space_id,
        created_at=event.occurred_at,
        updated_at=event.occurred_at,
        created_by_id=event.user_id,
        created_by_at=event.occurred_at if has_user else None,
        created_by_event_id=event.event_id if has_user else None,
        created_by_digest=digest if has_user else None,
    )


# -- folding ---------------------------------------------------------------------------------


class _Mergeable(Protocol):
    def merge(self, other: Self) -> Self: ...


K = TypeVar("K")
R = TypeVar("R", bound=_Mergeable)


def _fold(rows: dict[K, R], key: K, row: R) -> None:
    current = rows.get(key)
    rows[key] = row if current is None else current.merge(row)


class Admission:
    """The order-dependent rules, judged in arrival order: the first search space seen for a
    thread binds it, and the first key seen for a turn-less message's event_id holds it. Its
    memory is one entry per thread and per turn-less message, never rows or events."""

    def __init__(self, stored: StoredState) -> None:
        self.spaces = {thread_id: row.search_space_id for thread_id, row in stored.threads.items()}
        self.origins = {
            k.origin_event_id: k for k in stored.messages if k.origin_event_id is not None
        }

    def check(self, event: AnyEvent) -> Rejection | None:
        """Why the event cannot be applied after what came before it; None binds its thread
        and its turn-less keys (an exact copy binds the same again)."""
        rejection = _rejection(event, self.spaces, self.origins)
        if rejection is None:
            self.spaces.setdefault(event.thread_id, event.search_space_id)
            for key in message_keys(event):
                if key.origin_event_id is not None:
                    self.origins.setdefault(key.origin_event_id, key)
        return rejection


class Fold:
    """Admitted events folded one at a time into one candidate row per key. Holds rows, never
    events; `verify` folds one thread at a time through it."""

    def __init__(self) -> None:
        self.threads: dict[int, ThreadRow] = {}
        self.messages: dict[MessageKey, MessageRow] = {}
        self.usage: dict[MessageKey, UsageRow] = {}

    def add(self, event: AnyEvent, digest: bytes, dumped: Mapping[str, Any]) -> None:
        """Fold an event that passed `Admission.check` (folding an exact copy again changes
        nothing); `digest` and `dumped`: its payload_digest and payload."""
        _fold(self.threads, event.thread_id, thread_candidate(event, digest))
        event_messages, event_usage = candidates(event, digest, dumped)
        for message in event_messages:
            _fold(self.messages, message.key, message)
        if event_usage is not None:
            _fold(self.usage, event_usage.key, event_usage)


def reduce_batch(events: Sequence[AnyEvent], stored: StoredState) -> BatchPlan:
    """Fold a batch (in arrival order) against the stored registers."""
    admission, fold = Admission(stored), Fold()
    decided: list[Outcome | None] = []  # None: accepted, decided once the batch is folded
    copies: list[Copy | None] = []
    rejections: dict[int, Rejection] = {}
    seen: set[Copy] = set()
    # The batch decoder hands out one object for a value it saw twice: its copy is known.
    copy_of: dict[int, Copy] = {}

    for index, event in enumerate(events):
        rejection = admission.check(event)
        if rejection is not None:
            rejections[index] = rejection
            decided.append(Outcome.REJECTED)
            copies.append(None)
            continue
        copy = copy_of.get(id(event))
        if copy is not None:
            copies.append(copy)
            decided.append(Outcome.DUPLICATE)
            continue
        dumped = payload(event)
        digest = payload_digest(event, dumped)
        copy = copy_of[id(event)] = Copy(event.event_id, event.occurred_at, digest)
        copies.append(copy)
        if copy in seen:
            decided.append(Outcome.DUPLICATE)
            continue
        seen.add(copy)
        decided.append(None)
        fold.add(event, digest, dumped)

    threads, messages, usage = fold.threads, fold.messages, fold.usage
    outcomes = _outcomes(copies, decided, messages, usage, stored)
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
        rejections=rejections,
    )


def _rejection(
    event: AnyEvent, spaces: Mapping[int, int], origins: Mapping[uuid.UUID, MessageKey]
) -> Rejection | None:
    """Why the event cannot be applied given what came before it, or None. A rejected event
    binds nothing, so it cannot change how later events are judged."""
    space = spaces.get(event.thread_id)
    if space is not None and space != event.search_space_id:
        return Rejection(
            reason=RejectReason.THREAD_SEARCH_SPACE_MISMATCH,
            detail=f"thread {event.thread_id} belongs to another search space",
        )
    for key in message_keys(event):
        if key.origin_event_id is None:
            continue
        holder = origins.get(key.origin_event_id)
        if holder is not None and holder != key:
            return Rejection(
                reason=RejectReason.EVENT_ID_CONFLICT,
                detail=f"event_id {key.origin_event_id} already keys a turn-less"
                f" {holder.role} message in thread {holder.thread_id}",
            )
    return None


def _outcomes(
    copies: list[Copy | None],
    decided: list[Outcome | None],
    messages: dict[MessageKey, MessageRow],
    usage: dict[MessageKey, UsageRow],
    stored: StoredState,
) -> list[Outcome]:
    """Applied if the copy holds a register it did not hold before; duplicate if it already
    held one (a redelivery); superseded if it lost everywhere."""
    winners = {
        row.claim.copy
        for row in messages.values()
        if _content_wins(row, stored.messages.get(row.key))
    } | {row.claim.copy for row in usage.values() if _usage_wins(row, stored.messages.get(row.key))}
    stored_winners = {m.claim.copy for m in stored.messages.values()} | {
        m.usage_claim.copy for m in stored.messages.values() if m.usage_claim
    }
    outcomes = []
    for copy, outcome in zip(copies, decided, strict=True):
        if outcome is None:
            if copy in winners:
                outcome = Outcome.APPLIED
            elif copy in stored_winners:
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
    previous = (stored.usage_attribution if stored else None) or {}
    current = attribution(usage_totals(row), row.model_breakdown)
    changes = []
    for model in sorted(set(current) | set(previous)):
        new, old = current.get(model, {}), previous.get(model, {})
        delta = {name: new.get(name, 0) - old.get(name, 0) for name in USAGE_FIELDS}
        if any(delta.values()):
            changes.append(UsageChange(model=model, **delta))
    return changes
