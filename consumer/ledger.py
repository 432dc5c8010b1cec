"""The whole ledger as values: rebuilt from events by the merge rules, and compared with what
the database holds. Pure; used by `token-ledger verify` and the property tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumer.merge import (
    MessageKey,
    MessageRow,
    Outcome,
    StoredState,
    ThreadRow,
    UsageRow,
    reduce_batch,
)
from producer.events import AnyEvent


@dataclass(frozen=True)
class Ledger:
    threads: dict[int, ThreadRow]
    messages: dict[MessageKey, MessageRow]
    usage: dict[MessageKey, UsageRow]
    rejected: list[AnyEvent]


def rebuild(events: Sequence[AnyEvent]) -> Ledger:
    """The ledger the given events (in arrival order) must produce from an empty database."""
    plan = reduce_batch(events, StoredState())
    return Ledger(
        threads={row.id: row for row in plan.threads},
        messages={row.key: row for row in plan.messages},
        usage={row.key: row for row in plan.usage},
        rejected=[e for e, o in zip(events, plan.outcomes, strict=True) if o is Outcome.REJECTED],
    )


@dataclass(frozen=True)
class LedgerRows:
    """The ledger as comparable values: natural keys, no surrogate ids, no wall-clock times."""

    threads: dict[int, tuple[Any, ...]]
    messages: dict[MessageKey, tuple[Any, ...]]
    usage: dict[MessageKey, tuple[Any, ...]]


def thread_values(row: ThreadRow) -> tuple[Any, ...]:
    return (row.search_space_id, row.created_by_id, row.created_at, row.updated_at)


def message_values(row: MessageRow) -> tuple[Any, ...]:
    return (row.content, row.author_id, row.claim, row.created_at)


def usage_values(row: UsageRow) -> tuple[Any, ...]:
    return (
        row.source,
        row.claim,
        row.prompt_tokens,
        row.completion_tokens,
        row.total_tokens,
        row.cost_micros,
        row.model_breakdown,
        row.call_details,
        row.search_space_id,
        row.user_id,
        row.created_at,
    )


def expected_rows(ledger: Ledger) -> LedgerRows:
    return LedgerRows(
        threads={k: thread_values(r) for k, r in ledger.threads.items()},
        messages={k: message_values(r) for k, r in ledger.messages.items()},
        usage={k: usage_values(r) for k, r in ledger.usage.items()},
    )
