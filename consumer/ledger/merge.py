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

Identity (docs/contract.md#identity): only an exact copy (same event_id, occurred_at and payload digest)
is a duplicate. Differing copies of one event_id all take part in the registers, ordered by
their digest last. The one case that would need two rows for one event_id (a turn-less message
in another thread or role) rejects the later arrival as `event_id_conflict`; with the search
space rule it is the only place where arrival order decides.

`reduce_batch(events, stored)` folds a batch into one candidate row per key (the rows and
claims of claims.py, which the guarded upserts of store.py write) and compares it with the
stored registers to give each event an outcome and the usage that became authoritative.
`rebuild(events)` (rebuild.py) is the whole ledger from scratch, which is what `verify` and
the property tests compare the database with.

Usage is counted per model by `attribution`: the breakdown's numbers, plus the part of the
row's totals that the breakdown does not cover under `(unattributed)`, so the per-model figures
always add up to the row (legacy breakdowns may be missing, partial or inconsistent).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol, Self, TypeVar

from consumer.ledger.claims import (
    BatchPlan,
    Copy,
    EventRows,
    MessageKey,
    MessageRow,
    Outcome,
    StoredMessage,
    StoredState,
    ThreadRow,
    UsageChange,
    UsageRow,
    candidates,
    content_beats,
    thread_candidate,
    turnless_key,
    usage_beats,
    usage_totals,
)
from producer.events import USAGE_MEASURES, Rejection, RejectReason, attribution
from producer.ledger_event import LedgerEvent

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

    def check(self, event: LedgerEvent) -> Rejection | None:
        """Why the event cannot be applied after what came before it; None binds its thread
        and its turn-less key (an exact copy binds the same again)."""
        turnless = turnless_key(event)
        rejection = _rejection(event, turnless, self.spaces, self.origins)
        if rejection is None:
            self.spaces.setdefault(event.thread_id, event.search_space_id)
            if turnless is not None:
                self.origins.setdefault(event.event_id, turnless)
        return rejection


class Fold:
    """Admitted events folded one at a time into one candidate row per key. Holds rows, never
    events; `verify` folds one thread at a time through it."""

    def __init__(self) -> None:
        self.threads: dict[int, ThreadRow] = {}
        self.messages: dict[MessageKey, MessageRow] = {}
        self.usage: dict[MessageKey, UsageRow] = {}

    def add(self, event: LedgerEvent, rows: EventRows | None = None) -> None:
        """Fold an event that passed `Admission.check` (folding an exact copy again changes
        nothing). `rows`: its candidate rows (`event_rows`), if already built."""
        if rows is None:
            rows = thread_candidate(event), *candidates(event)
        thread, event_messages, event_usage = rows
        _fold(self.threads, event.thread_id, thread)
        for message in event_messages:
            _fold(self.messages, message.key, message)
        if event_usage is not None:
            _fold(self.usage, event_usage.key, event_usage)


def reduce_batch(
    events: Sequence[LedgerEvent],
    stored: StoredState,
    rows: Sequence[EventRows] | None = None,
) -> BatchPlan:
    """Fold a batch (in arrival order) against the stored registers. An exact copy of a stored
    claim (a redelivery) was applied whole when it won, and every register only moves forward,
    so it is a duplicate before any row is built. `rows`: each event's candidate rows
    (`event_rows`), if already built."""
    admission, fold = Admission(stored), Fold()
    decided: list[Outcome | None] = []  # None: accepted, decided once the batch is folded
    copies: list[Copy | None] = []
    rejections: dict[int, Rejection] = {}
    seen: set[Copy] = _stored_copies(stored)

    for index, event in enumerate(events):
        copy: Copy = (event.event_id, event.occurred_at, event.digest)
        if copy in seen:
            copies.append(copy)
            decided.append(Outcome.DUPLICATE)
            continue
        rejection = admission.check(event)
        if rejection is not None:
            rejections[index] = rejection
            decided.append(Outcome.REJECTED)
            copies.append(None)
            continue
        copies.append(copy)
        seen.add(copy)
        decided.append(None)
        fold.add(event, None if rows is None else rows[index])

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


def _stored_copies(stored: StoredState) -> set[Copy]:
    """Every copy that holds a stored register: content, usage, or a thread's creator."""
    copies = {m.claim.copy for m in stored.messages.values()}
    copies.update(m.usage_claim.copy for m in stored.messages.values() if m.usage_claim)
    for thread in stored.threads.values():
        if (creator := thread.creator_claim) is not None:
            copies.add((creator[1], creator[0], creator[2]))
    return copies


def _rejection(
    event: LedgerEvent,
    turnless: MessageKey | None,
    spaces: Mapping[int, int],
    origins: Mapping[uuid.UUID, MessageKey],
) -> Rejection | None:
    """Why the event cannot be applied given what came before it, or None. A rejected event
    binds nothing, so it cannot change how later events are judged."""
    space = spaces.get(event.thread_id)
    if space is not None and space != event.search_space_id:
        return Rejection(
            reason=RejectReason.THREAD_SEARCH_SPACE_MISMATCH,
            detail=f"thread {event.thread_id} belongs to another search space",
        )
    if turnless is not None:
        holder = origins.get(event.event_id)
        if holder is not None and holder != turnless:
            return Rejection(
                reason=RejectReason.EVENT_ID_CONFLICT,
                detail=f"event_id {event.event_id} already keys a turn-less"
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
    """Applied if the copy holds a register it did not hold before; superseded if it lost
    everywhere (duplicates were decided while folding)."""
    winners = {
        row.claim.copy
        for row in messages.values()
        if _content_wins(row, stored.messages.get(row.key))
    } | {row.claim.copy for row in usage.values() if _usage_wins(row, stored.messages.get(row.key))}
    outcomes = []
    for copy, outcome in zip(copies, decided, strict=True):
        if outcome is None:
            outcome = Outcome.APPLIED if copy in winners else Outcome.SUPERSEDED
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
    current = attribution(usage_totals(row), row.model_breakdown)
    previous = stored.usage_attribution() if stored else {}
    if not previous:  # a new usage row (most of them): the change is the whole row
        return [
            UsageChange(model, *(share[name] for name in USAGE_MEASURES))
            for model, share in sorted(current.items())
            if any(share.values())
        ]
    changes = []
    for model in sorted(set(current) | set(previous)):
        new, old = current.get(model, {}), previous.get(model, {})
        delta = {name: new.get(name, 0) - old.get(name, 0) for name in USAGE_MEASURES}
        if any(delta.values()):
            changes.append(UsageChange(model=model, **delta))
    return changes
