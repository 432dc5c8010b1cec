"""The whole ledger as values: rebuilt from events by the merge rules, and compared with what
the database holds. Pure; used by `token-ledger verify` and the property tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.merge import (
    Fold,
    MessageKey,
    MessageRow,
    StoredState,
    ThreadRow,
    UsageRow,
)
from producer.events import AnyEvent, payload, payload_digest


@dataclass(frozen=True)
class Ledger:
    threads: dict[int, ThreadRow]
    messages: dict[MessageKey, MessageRow]
    usage: dict[MessageKey, UsageRow]


class Rebuild:
    """The ledger built one event at a time (in arrival order) from an empty database.

    Holds the ledger's rows, never the events, so `verify` streams a whole topic through it.
    From an empty database every folded row is written: these are reduce_batch's rows for the
    same events (an exact copy folds to no change, so duplicates need no bookkeeping)."""

    def __init__(self) -> None:
        self._fold = Fold(StoredState())

    def add(self, event: AnyEvent) -> None:
        if self._fold.check(event) is None:
            dumped = payload(event)
            self._fold.add(event, payload_digest(event, dumped), dumped)

    def ledger(self) -> Ledger:
        fold = self._fold
        return Ledger(threads=fold.threads, messages=fold.messages, usage=fold.usage)


def rebuild(events: Iterable[AnyEvent]) -> Ledger:
    """The ledger the given events (in arrival order) must produce from an empty database."""
    built = Rebuild()
    for event in events:
        built.add(event)
    return built.ledger()


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


THREAD_FIELDS = ("search_space_id", "created_by_id", "created_at", "updated_at")
MESSAGE_FIELDS = ("content", "author_id", "content_claim", "created_at")
USAGE_FIELDS = (
    "source",
    "source_claim",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_micros",
    "model_breakdown",
    "call_details",
    "search_space_id",
    "user_id",
    "created_at",
)


@dataclass(frozen=True)
class Difference:
    """One row that is missing, unexpected, or different; never quotes content."""

    table: str
    key: str
    problem: str


def describe_key(key: MessageKey | int) -> str:
    if isinstance(key, int):
        return f"thread {key}"
    where = f"turn {key.turn_id}" if key.turn_id is not None else f"event {key.origin_event_id}"
    return f"thread {key.thread_id} {where} {key.role}"


def compare(expected: LedgerRows, actual: LedgerRows) -> list[Difference]:
    differences: list[Difference] = []
    tables: list[
        tuple[str, Mapping[Any, tuple[Any, ...]], Mapping[Any, tuple[Any, ...]], tuple[str, ...]]
    ] = [
        ("chat_threads", expected.threads, actual.threads, THREAD_FIELDS),
        ("chat_messages", expected.messages, actual.messages, MESSAGE_FIELDS),
        ("token_usage", expected.usage, actual.usage, USAGE_FIELDS),
    ]
    for table, want, have, names in tables:
        for key in sorted(want.keys() | have.keys(), key=_sortable):
            if key not in have:
                differences.append(Difference(table, describe_key(key), "missing"))
            elif key not in want:
                differences.append(Difference(table, describe_key(key), "unexpected"))
            elif want[key] != have[key]:
                fields = [n for n, a, b in zip(names, want[key], have[key], strict=True) if a != b]
                differences.append(
                    Difference(table, describe_key(key), f"differs in {', '.join(fields)}")
                )
    return differences


def _sortable(key: MessageKey | int) -> tuple[Any, ...]:
    return (key,) if isinstance(key, int) else key.sort_key()


def totals(rows: LedgerRows) -> dict[str, int]:
    """Row counts and the billing sums (tokens, cost) of a ledger."""
    names = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")
    sums = dict.fromkeys(names, 0)
    for values in rows.usage.values():
        for name in names:
            sums[name] += values[USAGE_FIELDS.index(name)]
    return {
        "threads": len(rows.threads),
        "messages": len(rows.messages),
        "usage_rows": len(rows.usage),
        **sums,
    }
