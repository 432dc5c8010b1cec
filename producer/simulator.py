"""Realistic, seeded chat traffic and the ledger it must produce.

`plan_traffic(TrafficConfig(...))` returns the records to publish (key, value) in publish order
and an `Expectation`: the ledger summary that applying them must yield. The expectation is
kept by construction (what each scenario creates), not by running the merge rules, so it is an
independent check of the consumer.

Scenarios per thread: turns (started + finalized, with text and tool-call parts and 1-3 LLM
calls from a model mix), some finalized twice (content of the later, cost of the first), legacy
appends that shadow a server turn (never win), standalone legacy messages (v1 and v0 bodies),
duplicate publishes of any record, shuffles inside a thread (finalize before start), and poison
records that must each end in the dead-letter topic.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from producer.client import thread_key
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
    encode_event,
)

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


@dataclass(frozen=True)
class TrafficConfig:
    threads: int = 100
    turns_per_thread: int = 5
    seed: int = 1
    duplicate_rate: float = 0.1
    legacy_rate: float = 0.1
    second_finalize_rate: float = 0.05
    shuffle_rate: float = 0.2
    poison_rate: float = 0.01
    search_spaces: int = 5
    start: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Expectation:
    threads: int = 0
    messages: int = 0
    usage_rows: int = 0
    dead_letters: int = 0
    records: int = 0
    duplicates: int = 0
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total_cost_micros(self) -> int:
        return sum(m["cost_micros"] for m in self.per_model.values())

    @property
    def total_tokens(self) -> int:
        return sum(m["total_tokens"] for m in self.per_model.values())

    def count_usage(self, by_model: dict[str, ModelUsage]) -> None:
        self.usage_rows += 1
        for model, usage in by_model.items():
            totals = self.per_model.setdefault(
                model,
                {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_micros": 0},
            )
            for name in totals:
                totals[name] += getattr(usage, name)

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "messages": self.messages,
            "usage_rows": self.usage_rows,
            "dead_letters": self.dead_letters,
            "records": self.records,
            "duplicates": self.duplicates,
            "total_tokens": self.total_tokens,
            "total_cost_micros": self.total_cost_micros,
            "per_model": {model: self.per_model[model] for model in sorted(self.per_model)},
        }


Record = tuple[bytes, bytes]


class _Planner:
    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # noqa: S311 - reproducible traffic, not secrets
        self.expect = Expectation()
        self.poisoned_threads: set[int] = set()

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def calls(self) -> list[UsageCall]:
        calls = []
        for _ in range(self.rng.randint(1, 3)):
            model, kind, prompt_rate, completion_rate = self.rng.choice(MODELS)
            prompt = self.rng.randint(20, 4000)
            completion = 0 if kind == "embedding" else self.rng.randint(1, 1500)
            calls.append(
                UsageCall(
                    model=model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                    cost_micros=(prompt * prompt_rate + completion * completion_rate) // 1000,
                    call_kind=kind,
                )
            )
        return calls

    def content(self, turn: int) -> list[ContentPart]:
        parts = [ContentPart(type="text", text=f"Answer {turn}: {self.rng.choice(QUERIES)} …")]
        if self.rng.random() < 0.4:
            call_id = f"call_{self.rng.getrandbits(32):08x}"
            parts.append(
                ContentPart.model_validate(
                    {
                        "type": "tool-call",
                        "toolCallId": call_id,
                        "toolName": "search",
                        "args": {"q": "Q3"},
                        "result": {"hits": self.rng.randint(0, 9)},
                    }
                )
            )
        return parts

    def thread(self, index: int) -> list[Record]:
        """One thread's records in its own order; a poison record, if any, comes last."""
        cfg, rng = self.config, self.rng
        thread_id = rng.randint(1, 2**62)
        space = rng.randint(1, cfg.search_spaces)
        user = self.uuid()
        at = cfg.start + timedelta(seconds=index)
        envelope: dict[str, Any] = {
            "schema_version": 1,
            "thread_id": thread_id,
            "search_space_id": space,
            "user_id": user,
        }
        events: list[AnyEvent | bytes] = []
        self.expect.threads += 1
        for turn in range(cfg.turns_per_thread):
            turn_id = f"{thread_id}:{int(at.timestamp() * 1000) + turn}"
            at += timedelta(milliseconds=rng.randint(1, 5000))
            events.append(
                TurnStarted(
                    **envelope,
                    type="turn.started",
                    event_id=self.uuid(),
                    occurred_at=at,
                    turn_id=turn_id,
                    user_query=rng.choice(QUERIES),
                    mentioned_documents=[
                        {"id": turn, "title": "Q3 report", "document_type": "FILE"}
                    ]
                    if rng.random() < 0.3
                    else [],
                )
            )
            self.expect.messages += 2
            calls = self.calls() if rng.random() < 0.9 else []
            finalizes = 2 if rng.random() < cfg.second_finalize_rate else 1
            for attempt in range(finalizes):
                at += timedelta(milliseconds=rng.randint(1, 20000))
                these_calls = calls if attempt == 0 else (self.calls() if calls else [])
                events.append(
                    TurnFinalized(
                        **envelope,
                        type="turn.finalized",
                        event_id=self.uuid(),
                        occurred_at=at,
                        turn_id=turn_id,
                        content=self.content(turn) if rng.random() < 0.95 else [],
                        usage=TurnUsage(calls=these_calls) if these_calls else None,
                    )
                )
            if calls:  # the first finalize's cost is authoritative
                self.expect.count_usage(_by_model(calls))
                if rng.random() < cfg.legacy_rate:  # a legacy append shadowing it never wins
                    events.append(self.legacy(envelope, at, turn_id, rng.choice(MODELS)[0]))
            if rng.random() < cfg.legacy_rate:
                events.append(self.standalone_legacy(envelope, at))
        records = [e if isinstance(e, bytes) else encode_event(e) for e in events]
        if rng.random() < cfg.shuffle_rate:
            rng.shuffle(records)  # e.g. finalize before start; the ledger must not care
        if rng.random() < cfg.poison_rate * cfg.turns_per_thread:
            records.append(self.poison(envelope))
            self.poisoned_threads.add(index)
        key = thread_key(thread_id)
        return [(key, value) for value in records]

    def legacy(
        self, envelope: dict[str, Any], at: datetime, turn_id: str | None, model: str
    ) -> MessageAppended:
        prompt, completion = self.rng.randint(10, 900), self.rng.randint(1, 300)
        usage = ModelUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cost_micros=self.rng.randint(1, 9000),
        )
        return MessageAppended(
            **envelope,
            type="message.appended",
            event_id=self.uuid(),
            occurred_at=at + timedelta(milliseconds=self.rng.randint(-30000, 30000)),
            turn_id=turn_id,
            role="assistant",
            content=self.content(0),
            token_usage=LegacyTokenUsage(
                **usage.model_dump(),
                usage={model: usage},
                call_details=[{"model": model, **usage.model_dump()}],
            ),
        )

    def standalone_legacy(self, envelope: dict[str, Any], at: datetime) -> AnyEvent | bytes:
        """A legacy message without turn_id: a row of its own (keyed by its event_id)."""
        self.expect.messages += 1
        kind = self.rng.random()
        if kind < 0.4:
            message = self.legacy(envelope, at, None, self.rng.choice(MODELS)[0])
            assert message.token_usage and message.token_usage.usage
            self.expect.count_usage(message.token_usage.usage)
            return message
        if kind < 0.7:
            return MessageAppended(
                **envelope,
                type="message.appended",
                event_id=self.uuid(),
                occurred_at=at,
                role="user",
                content=[ContentPart(type="text", text="typed in the old frontend")],
            )
        # v0 body: its event_id derives from the body, so the text must make it unique.
        body = {
            "type": "message.appended",
            "schema_version": 0,
            "thread_id": envelope["thread_id"],
            "search_space_id": envelope["search_space_id"],
            "user_id": str(envelope["user_id"]),
            "turn_id": None,
            "role": "user",
            "content": [{"type": "text", "text": f"old bundle message {self.uuid()}"}],
        }
        return json.dumps(body).encode()

    def poison(self, envelope: dict[str, Any]) -> bytes:
        self.expect.dead_letters += 1
        good = {
            **envelope,
            "user_id": str(envelope["user_id"]),
            "type": "turn.started",
            "event_id": str(self.uuid()),
            "occurred_at": self.config.start.isoformat(),
            "turn_id": "poison:1",
            "user_query": "q",
        }
        variants: list[dict[str, Any] | bytes] = [
            b"{not json",
            b"\xff\xfe not utf-8",
            {**good, "type": "turn.exploded"},
            {**good, "schema_version": 7},
            {**good, "thread_id": -4},
            {**good, "user_query": "nul \u0000 inside"},
            # Same thread, another tenant: arrives after the thread exists, so it is the one
            # rejected (thread_search_space_mismatch).
            {**good, "search_space_id": envelope["search_space_id"] + 10_000},
        ]
        choice = self.rng.choice(variants)
        return choice if isinstance(choice, bytes) else json.dumps(choice).encode()


def _by_model(calls: list[UsageCall]) -> dict[str, ModelUsage]:
    sums: dict[str, ModelUsage] = {}
    for call in calls:
        prev = sums.get(call.model, ModelUsage())
        sums[call.model] = ModelUsage(
            prompt_tokens=call.prompt_tokens + (prev.prompt_tokens or 0),
            completion_tokens=call.completion_tokens + (prev.completion_tokens or 0),
            total_tokens=call.total_tokens + (prev.total_tokens or 0),
            cost_micros=call.cost_micros + (prev.cost_micros or 0),
        )
    return sums


def plan_traffic(config: TrafficConfig) -> tuple[list[Record], Expectation]:
    """Every record to publish, in order, and the ledger summary they must produce."""
    planner = _Planner(config)
    per_thread = [planner.thread(i) for i in range(config.threads)]
    # Interleave threads at random while each keeps its own order (one key, one partition).
    records: list[Record] = []
    cursors = [0] * len(per_thread)
    live = [i for i, recs in enumerate(per_thread) if recs]
    while live:
        pick = planner.rng.randrange(len(live))
        thread = live[pick]
        record = per_thread[thread][cursors[thread]]
        records.append(record)
        cursors[thread] += 1
        is_last = cursors[thread] == len(per_thread[thread])
        # Poison is never re-sent, so each one is exactly one dead letter.
        is_poison = is_last and thread in planner.poisoned_threads
        if not is_poison and planner.rng.random() < config.duplicate_rate:
            records.append(record)  # a producer retry: the same bytes again
            planner.expect.duplicates += 1
        if is_last:
            live.pop(pick)
    planner.expect.records = len(records)
    return records, planner.expect
