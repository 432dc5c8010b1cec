"""The whole ledger as values: rebuilt from events by the merge rules, and compared with what
the database holds. Pure; used by `token-ledger verify` and the property tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.ledger.claims import MessageKey, MessageRow, StoredState, ThreadRow, UsageRow
from consumer.ledger.merge import Admission, Fold
from producer import jsonvalues
from producer.events import USAGE_MEASURES
from producer.ledger_event import LedgerEvent


@dataclass(frozen=True)
class Ledger:
    threads: dict[int, ThreadRow]
    messages: dict[MessageKey, MessageRow]
    usage: dict[MessageKey, UsageRow]


def rebuild(events: Iterable[LedgerEvent]) -> Ledger:
    """The ledger the given events (in arrival order) must produce from an empty database."""
    stored = StoredState()
    admission, fold = Admission(stored), Fold()
    for event in events:
        if admission.check(event) is None:
            fold.add(event)
    return Ledger(threads=fold.threads, messages=fold.messages, usage=fold.usage)


def rebuild_by_thread(
    threads: Iterable[tuple[int, Iterable[LedgerEvent]]],
) -> Iterator[tuple[int, LedgerRows]]:
    """Each thread's expected rows from its admitted events (see merge.Admission), one thread at
    a time: every row of a thread is keyed by it, so the threads fold independently and memory
    is one thread's rows. From an empty database every folded row is written: these are
    reduce_batch's rows for the same events (an exact copy folds to no change)."""
    for thread_id, events in threads:
        fold = Fold()
        for event in events:
            fold.add(event)
        yield (
            thread_id,
            expected_rows(Ledger(threads=fold.threads, messages=fold.messages, usage=fold.usage)),
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
    # JSON as its value: jsonb keeps neither the text's key order nor its spacing.
    return (jsonvalues.loads(row.content), row.author_id, row.claim, row.created_at)


def usage_values(row: UsageRow) -> tuple[Any, ...]:
    return (
        row.source,
        row.claim,
        row.prompt_tokens,
        row.completion_tokens,
        row.total_tokens,
        row.cost_micros,
        row.model_breakdown,
        jsonvalues.loads(row.call_details),
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
USAGE_VALUES = (
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
        ("token_usage", expected.usage, actual.usage, USAGE_VALUES),
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


_BILLED_AT = tuple(USAGE_VALUES.index(name) for name in USAGE_MEASURES)
TOTALS = ("threads", "messages", "usage_rows", *USAGE_MEASURES)  # row counts, then billing sums


def add_totals(sums: dict[str, int], rows: LedgerRows) -> dict[str, int]:
    """`sums` (keyed by TOTALS) with a part of a ledger added: one thread's rows at a time."""
    sums["threads"] += len(rows.threads)
    sums["messages"] += len(rows.messages)
    sums["usage_rows"] += len(rows.usage)
    for values in rows.usage.values():
        for name, at in zip(USAGE_MEASURES, _BILLED_AT, strict=True):
            sums[name] += values[at]
    return sums
