"""What the simulated traffic is made of: its settings, the models and questions it draws
from, and the seam through which the chaos run supplies poison records (PoisonSource)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from producer import jsonvalues
from producer.events import USAGE_MEASURES, ContentPart, TurnStarted, UsageCall

# (model, call_kind, micros per 1k prompt tokens, micros per 1k completion tokens)
MODELS = (
    ("gpt-4o-mini", "chat", 150, 600),
    ("gpt-4o", "chat", 2500, 10000),
    ("claude-sonnet-4", "chat", 3000, 15000),
    ("text-embedding-3-small", "embedding", 20, 0),
)
QUERIES = (
    "Summarise the Q3 report",
    "Quelle est la différence entre TCP et UDP ?",
    "Why does `SELECT * FROM t WHERE a = '1'; DROP TABLE t;--` look dangerous?",
    "Explain KRaft in two sentences 🚀",
    "数据库事务的隔离级别有哪些？",  # noqa: RUF001 - real CJK punctuation on purpose
)
# How far occurred_at moves within a thread: before a start, before each finalize, and the
# jitter of a legacy append around its turn.
START_GAP_MS, FINALIZE_GAP_MS, LEGACY_JITTER_MS = 5_000, 20_000, 30_000


@dataclass(frozen=True)
class TrafficConfig:
    threads: int = 100
    turns_per_thread: int = 5
    seed: int = 1
    duplicate_rate: float = 0.1
    legacy_rate: float = 0.1
    second_finalize_rate: float = 0.05
    shuffle_rate: float = 0.2
    poison_rate: float = 0.01  # poison records per turn, on average (each thread's come last)
    search_spaces: int = 5
    # Of legacy token_usage: breakdown partial per model, `{}`, null (the rest: full).
    legacy_partial_rate: float = 0.3
    legacy_empty_rate: float = 0.15
    legacy_null_rate: float = 0.15
    v0_resend_rate: float = 0.5  # v0 bodies published again after everything else
    retry_rate: float = 0.02  # records re-sent later by a producer retry (exact copies)
    restamp_rate: float = 0.0  # retries that re-stamped occurred_at (differing copies)
    unknown_field_rate: float = 0.1  # calls, parts and envelopes with fields not known yet
    start: datetime | None = None  # None: the plan ends about now
    queries: tuple[str, ...] = QUERIES  # what users ask; answers quote them too

    def __post_init__(self) -> None:
        if self.legacy_partial_rate + self.legacy_empty_rate + self.legacy_null_rate > 1:
            raise ValueError("legacy partial + empty + null rates exceed 1")

    def span(self) -> timedelta:
        """An upper bound of how far the plan's occurred_at run past its start."""
        per_turn = START_GAP_MS + 2 * FINALIZE_GAP_MS
        return timedelta(
            seconds=self.threads,
            milliseconds=self.turns_per_thread * per_turn + LEGACY_JITTER_MS,
        )


Record = tuple[bytes, bytes]
# What turn.finalized with an empty content list stores (docs/contract.md#turnfinalized).
NO_TEXT_RESPONSE = {"type": "status", "text": "(no text response)"}


@dataclass(frozen=True)
class PoisonContext:
    """What a poison record may build on: its thread's envelope (schema_version, thread_id,
    search_space_id, user_id as text), a valid occurred_at, and the wire documents of the
    thread's turn-less v1 messages, all published before it."""

    envelope: dict[str, Any]
    start: datetime
    turnless: list[dict[str, Any]]


class PoisonSource(Protocol):
    """Draws a poison record for a thread, or None when the kind drawn does not fit it."""

    def __call__(self, rng: random.Random, context: PoisonContext) -> bytes | None: ...


def asked(started: TurnStarted) -> list[dict[str, Any]]:
    """The user message a turn.started stores: the query, then the documents it mentions."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": started.user_query}]
    if started.mentioned_documents:
        parts.append({"type": "mentioned-documents", "documents": started.mentioned_documents})
    return parts


def restamped(value: bytes, later_ms: int) -> bytes:
    """The record as a retry that built its envelope again would send it: occurred_at later."""
    document = jsonvalues.loads(value)
    at = datetime.fromisoformat(document["occurred_at"]) + timedelta(milliseconds=later_ms)
    return jsonvalues.dumps({**document, "occurred_at": at.isoformat()}).encode()


def parts(parts: list[dict[str, Any]]) -> list[ContentPart]:
    return [ContentPart.model_validate(part) for part in parts]


def totals(calls: list[UsageCall]) -> dict[str, int]:
    return {name: sum(getattr(call, name) for call in calls) for name in USAGE_MEASURES}


def by_model(calls: list[UsageCall]) -> dict[str, dict[str, int]]:
    sums: dict[str, dict[str, int]] = {}
    for call in calls:
        model = sums.setdefault(call.model, dict.fromkeys(USAGE_MEASURES, 0))
        for name in USAGE_MEASURES:
            model[name] += getattr(call, name)
    return sums
