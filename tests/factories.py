"""Small builders for valid events with sensible defaults (pure data, no I/O)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from producer.events import (
    AnyEvent,
    ContentPart,
    LegacyTokenUsage,
    MessageAppended,
    ModelUsage,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
)
from producer.ledger_event import LedgerEvent, ledger_event

# Where simulated traffic starts in the tests (TrafficConfig.start), and the events built here.
START = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
T0 = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)
USER = uuid.UUID("0b6f3c1e-2f44-4d8e-9a77-3f1c2e5d9b10")
THREAD, SPACE, TURN = 4242, 7, "4242:1795252502118"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def call(
    model: str = "gpt-4o-mini",
    prompt: int = 100,
    completion: int = 50,
    total: int = 150,
    cost: int = 12345,
    kind: str = "chat",
    **unknown: Any,
) -> UsageCall:
    """A usage call; `unknown` fields (e.g. cached_tokens) are what newer producers add."""
    return UsageCall(
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cost_micros=cost,
        call_kind=kind,
        **unknown,
    )


def _envelope(
    event_id: uuid.UUID | None, seconds: float, thread_id: int, space: int, user: uuid.UUID | None
) -> dict[str, Any]:
    return {
        "event_id": event_id or uuid.uuid4(),
        "schema_version": 1,
        "occurred_at": at(seconds),
        "thread_id": thread_id,
        "search_space_id": space,
        "user_id": user,
    }


def started(
    *,
    query: str = "hello",
    documents: list[dict[str, Any]] | None = None,
    turn_id: str = TURN,
    seconds: float = 0,
    thread_id: int = THREAD,
    space: int = SPACE,
    user: uuid.UUID | None = USER,
    event_id: uuid.UUID | None = None,
) -> TurnStarted:
    return TurnStarted(
        **_envelope(event_id, seconds, thread_id, space, user),
        type="turn.started",
        turn_id=turn_id,
        user_query=query,
        mentioned_documents=documents or [],
    )


def finalized(
    *,
    content: list[dict[str, Any]] | None = None,
    calls: list[UsageCall] | None = None,
    turn_id: str = TURN,
    seconds: float = 10,
    thread_id: int = THREAD,
    space: int = SPACE,
    user: uuid.UUID | None = USER,
    event_id: uuid.UUID | None = None,
) -> TurnFinalized:
    parts = [{"type": "text", "text": "answer"}] if content is None else content
    return TurnFinalized(
        **_envelope(event_id, seconds, thread_id, space, user),
        type="turn.finalized",
        turn_id=turn_id,
        content=[ContentPart.model_validate(p) for p in parts],
        usage=TurnUsage(calls=calls) if calls is not None else None,
    )


def appended(
    *,
    role: Literal["user", "assistant", "system"] = "assistant",
    content: list[dict[str, Any]] | None = None,
    cost: int | None = None,
    model: str = "gpt-4o-mini",
    turn_id: str | None = TURN,
    seconds: float = 5,
    thread_id: int = THREAD,
    space: int = SPACE,
    user: uuid.UUID | None = USER,
    event_id: uuid.UUID | None = None,
    breakdown: dict[str, dict[str, Any]] | Literal["full"] | None = "full",
) -> MessageAppended:
    """A legacy append; with `cost`, token usage whose per-model `breakdown` is the full
    measures of `model` by default, or as given (None, {}, or any subset per model)."""
    usage = None
    if cost is not None:
        sums = ModelUsage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_micros=cost)
        by_model = (
            {model: sums}
            if breakdown == "full"
            else None
            if breakdown is None
            else {name: ModelUsage.model_validate(entry) for name, entry in breakdown.items()}
        )
        usage = LegacyTokenUsage(
            **sums.model_dump(), usage=by_model, call_details=[{"model": model}]
        )
    return MessageAppended(
        **_envelope(event_id, seconds, thread_id, space, user),
        type="message.appended",
        turn_id=turn_id,
        role=role,
        content=[ContentPart.model_validate(p) for p in content or [{"type": "text", "text": "x"}]],
        token_usage=usage,
    )


def ledger_events(events: Iterable[AnyEvent]) -> list[LedgerEvent]:
    """Events as the merge folds them (the reference decode path's conversion)."""
    return [ledger_event(event) for event in events]
