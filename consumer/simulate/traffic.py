"""Realistic, seeded chat traffic and the ledger it must produce.

`plan_traffic(TrafficConfig(...))` returns the records to publish (key, value) in publish order
and an `Expectation`: the ledger summary that applying them must yield. The expectation is
kept by construction (what each scenario creates), not by running the merge rules, so it is an
independent check of the consumer; per model it splits each usage row with
`producer.events.attribution` (SPEC section 7), as `token-ledger usage --by model` does.

Scenarios per thread: turns (started + finalized, with text and tool-call parts and 1-3 LLM
calls from a model mix), some finalized twice (content of the later, cost of the first), legacy
appends that shadow a server turn (never win), standalone legacy messages (v1 and v0 bodies),
shuffles inside a thread (finalize before start), and poison records that must each end in the
dead-letter topic. Every shape the contract allows (SPEC sections 2-3), each at its own rate:

- legacy `token_usage.usage` full, partial per model (any subset of the measures, some null),
  `{}` or null: the totals count, the breakdown's gaps are `(unattributed)`;
- exact copies: a retry published right after the original (`duplicate_rate`) or later, after
  other events of its thread (`retry_rate`); v0 bodies re-sent after everything else
  (`v0_resend_rate`): same bytes, later record timestamp, hence a later occurred_at;
- token kinds: half the calls report `cached_tokens`, and chat calls `reasoning_tokens`;
- fields this consumer does not know yet (`unknown_field_rate`): `audio_tokens` and
  `provider_latency_ms` in usage calls and `providerMetadata` in content parts (kept: counted in
  `Expectation.kept_unknown_fields`), `trace_id` and `producer` in the envelope (ignored).

`Expectation.shapes` counts what was published of each. Without an explicit `start` the plan
ends about now (start = now - `TrafficConfig.span()`), so no occurred_at lies ahead of its
record's timestamp however large the plan.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from consumer.simulate.expectation import KEPT_UNKNOWN_FIELDS as KEPT_UNKNOWN_FIELDS
from consumer.simulate.expectation import SHAPES as SHAPES
from consumer.simulate.expectation import UNKNOWN_CALL_FIELDS as UNKNOWN_CALL_FIELDS
from consumer.simulate.expectation import UNKNOWN_ENVELOPE_FIELDS as UNKNOWN_ENVELOPE_FIELDS
from consumer.simulate.expectation import UNKNOWN_PART_FIELD as UNKNOWN_PART_FIELD
from consumer.simulate.expectation import Expectation as Expectation
from consumer.simulate.expectation import row_key
from producer import jsonvalues
from producer.client import thread_key
from producer.decoding import v0_event_id
from producer.events import (
    USAGE_MEASURES,
    AnyEvent,
    ContentPart,
    MessageAppended,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
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
    poison_rate: float = 0.01
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
# What turn.finalized with an empty content list stores (SPEC section 2).
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


class _Planner:
    def __init__(self, config: TrafficConfig, poison: PoisonSource | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # noqa: S311 - reproducible traffic, not secrets
        self.start = config.start if config.start is not None else datetime.now(UTC) - config.span()
        self.expect = Expectation()
        self.poisoned_threads: set[int] = set()
        self.late: list[Record] = []  # published after everything else
        self.poison_source = poison
        # Of the thread being planned: records never to re-stamp (see `retried`), and the
        # wire documents of its turn-less v1 messages (what an event_id_conflict can reuse).
        self.pinned: set[bytes] = set()
        self.turnless: list[dict[str, Any]] = []

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def shape(self, name: str) -> None:
        self.expect.shapes[name] += 1

    def unknown(self) -> bool:
        return self.rng.random() < self.config.unknown_field_rate

    def encode(self, event: AnyEvent, **sent: Any) -> bytes:
        """The event's wire form (`sent` replaces fields with what a frontend sends as is);
        some envelopes carry fields this consumer does not know (ignored)."""
        document = {**event.model_dump(), **sent}
        if self.unknown():
            self.shape("unknown_envelope_fields")
            trace, producer = UNKNOWN_ENVELOPE_FIELDS
            document = {
                trace: f"{self.rng.getrandbits(128):032x}",
                **document,
                producer: {"name": "chat-api", "version": "2.7.0"},
            }
        return jsonvalues.dumps(document).encode()

    def calls(self) -> list[UsageCall]:
        calls = []
        for _ in range(self.rng.randint(1, 3)):
            model, kind, prompt_rate, completion_rate = self.rng.choice(MODELS)
            prompt = self.rng.randint(20, 4000)
            completion = 0 if kind == "embedding" else self.rng.randint(1, 1500)
            call: dict[str, Any] = {
                "model": model,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cost_micros": (prompt * prompt_rate + completion * completion_rate) // 1000,
                "call_kind": kind,
            }
            if self.rng.random() < 0.5:  # token kinds, as today's APIs report them
                call["cached_tokens"] = self.rng.randint(0, prompt)
                if completion:
                    call["reasoning_tokens"] = self.rng.randint(0, completion)
            if self.unknown():  # what newer producers add and this consumer does not know
                self.shape("unknown_call_fields")
                audio, latency = UNKNOWN_CALL_FIELDS
                call[audio] = self.rng.randint(0, prompt)
                call[latency] = self.rng.randint(1, 9000)
            calls.append(UsageCall.model_validate(call))
        return calls

    def content(self, text: str, *, tools: bool = True) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if tools and self.rng.random() < 0.4:
            parts.append(
                {
                    "type": "tool-call",
                    "toolCallId": f"call_{self.rng.getrandbits(32):08x}",
                    "toolName": "search",
                    "args": {"q": "Q3"},
                    "result": {"hits": self.rng.randint(0, 9)},
                }
            )
        for part in parts:
            if self.unknown():
                self.shape("unknown_part_fields")
                item = f"msg_{self.rng.getrandbits(64):016x}"
                part[UNKNOWN_PART_FIELD] = {"openai": {"itemId": item}}
        return parts

    def thread(self, index: int) -> list[Record]:
        """One thread's records in its own order; a poison record, if any, comes last."""
        cfg, rng = self.config, self.rng
        thread_id = rng.randint(1, 2**62)
        space = rng.randint(1, cfg.search_spaces)
        user = self.uuid()
        at = self.start + timedelta(seconds=index)
        envelope: dict[str, Any] = {
            "schema_version": 1,
            "thread_id": thread_id,
            "search_space_id": space,
            "user_id": user,
        }
        records: list[bytes] = []
        pinned = self.pinned = set()  # records whose re-stamped copy would change the ledger
        self.turnless = []
        self.expect.threads += 1
        for turn in range(cfg.turns_per_thread):
            turn_id = f"{thread_id}:{int(at.timestamp() * 1000) + turn}"
            at += timedelta(milliseconds=rng.randint(1, START_GAP_MS))
            documents = [{"id": turn, "title": "Q3 report", "document_type": "FILE"}]
            started = TurnStarted(
                **envelope,
                type="turn.started",
                event_id=self.uuid(),
                occurred_at=at,
                turn_id=turn_id,
                user_query=rng.choice(cfg.queries),
                mentioned_documents=documents if rng.random() < 0.3 else [],
            )
            records.append(self.encode(started))
            self.expect.messages += 2
            self.expect.set_content(row_key(thread_id, turn_id, "user", None), _asked(started))
            calls = self.calls() if rng.random() < 0.9 else []
            finalizes = 2 if rng.random() < cfg.second_finalize_rate else 1
            if finalizes == 2:
                self.shape("finalized_twice")
            content: list[dict[str, Any]] = []
            for attempt in range(finalizes):
                at += timedelta(milliseconds=rng.randint(1, FINALIZE_GAP_MS))
                these_calls = calls if attempt == 0 else (self.calls() if calls else [])
                answer = f"Answer {turn}: {rng.choice(cfg.queries)} …"
                content = self.content(answer) if rng.random() < 0.95 else []
                finalized = TurnFinalized(
                    **envelope,
                    type="turn.finalized",
                    event_id=self.uuid(),
                    occurred_at=at,
                    turn_id=turn_id,
                    content=_parts(content),
                    usage=TurnUsage(calls=these_calls) if these_calls else None,
                )
                records.append(self.encode(finalized))
                if attempt < finalizes - 1:  # re-stamped later, it would win the content
                    pinned.add(records[-1])
            self.expect.keep_parts(content)  # the later finalize's content wins
            answered = row_key(thread_id, turn_id, "assistant", None)
            self.expect.set_content(answered, content or [NO_TEXT_RESPONSE])
            if calls:  # the first finalize's cost is authoritative
                self.expect.count_usage(
                    answered, "turn.finalized", _totals(calls), _by_model(calls)
                )
                self.expect.keep_calls(calls)
                if rng.random() < cfg.legacy_rate:  # a legacy append shadowing it never wins
                    self.shape("legacy_shadowing_a_turn")
                    jitter = rng.randint(-LEGACY_JITTER_MS, LEGACY_JITTER_MS)
                    shadow = at + timedelta(milliseconds=jitter)
                    records.append(self.legacy(envelope, shadow, turn_id, wins=False))
            if rng.random() < cfg.legacy_rate:
                records.append(self.standalone_legacy(envelope, at))
        if rng.random() < cfg.shuffle_rate:
            self.shape("shuffled_threads")
            rng.shuffle(records)  # e.g. finalize before start; the ledger must not care
        records = self.retried(records, pinned)
        if rng.random() < cfg.poison_rate * cfg.turns_per_thread:
            records.append(self.poison(envelope))
            self.poisoned_threads.add(index)
        key = thread_key(thread_id)
        return [(key, value) for value in records]

    def retried(self, records: list[bytes], pinned: set[bytes]) -> list[bytes]:
        """Producer retries: the same record published again later, when possible after
        other records of its thread (exact copies: same event_id, occurred_at, payload), and
        (`restamp_rate`) retries that re-stamped occurred_at a little later: a differing copy
        of the event_id, which takes part in the merge and must leave the ledger as it is.
        `pinned` records are never re-stamped (the earlier of two finalizes would win the
        content register; a v0 body has no occurred_at)."""
        due: list[list[bytes]] = [[] for _ in range(len(records) + 1)]
        for position, value in enumerate(records):
            if self.rng.random() < self.config.retry_rate:
                later = self.rng.randint(min(position + 2, len(records)), len(records))
                due[later].append(value)
                self.shape("retries_later")
                self.expect.duplicates += 1
            restamp = self.config.restamp_rate and value not in pinned
            if restamp and self.rng.random() < self.config.restamp_rate:
                later = self.rng.randint(min(position + 1, len(records)), len(records))
                due[later].append(_restamped(value, self.rng.randint(1, 3_000)))
                self.expect.restamped += 1
        retried: list[bytes] = []
        for position, value in enumerate(records):
            retried += [*due[position], value]
        return retried + due[len(records)]

    def legacy_usage(self) -> tuple[dict[str, Any], dict[str, int], dict[str, dict[str, Any]]]:
        """A legacy `token_usage` as a frontend sends it, its totals and its breakdown as the
        ledger stores it: full, partial per model, `{}` or null (stored as `{}`)."""
        cfg, rng = self.config, self.rng
        full: dict[str, dict[str, Any]] = {}
        for model in rng.sample([m[0] for m in MODELS], rng.randint(1, 2)):
            prompt, completion = rng.randint(10, 900), rng.randint(1, 300)
            full[model] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cost_micros": rng.randint(1, 9000),
            }
        totals = {name: sum(entry[name] for entry in full.values()) for name in USAGE_MEASURES}
        draw = rng.random()
        breakdown: dict[str, dict[str, Any]] | None = full
        shape = "full"
        if draw < cfg.legacy_partial_rate:
            shape, breakdown = "partial", {m: self.partial(e) for m, e in full.items()}
        elif draw < cfg.legacy_partial_rate + cfg.legacy_empty_rate:
            shape, breakdown = "empty", {}
        elif draw < cfg.legacy_partial_rate + cfg.legacy_empty_rate + cfg.legacy_null_rate:
            shape, breakdown = "null", None
        self.shape(f"legacy_usage_{shape}")
        details = [{"model": model, **entry} for model, entry in full.items()]
        return {**totals, "usage": breakdown, "call_details": details}, totals, breakdown or {}

    def partial(self, entry: dict[str, int]) -> dict[str, int | None]:
        """Some of a model's measures (at least one left out; some of those sent as null)."""
        kept = self.rng.sample(USAGE_MEASURES, self.rng.randint(0, 3))
        return {
            name: entry[name] if name in kept else None
            for name in USAGE_MEASURES
            if name in kept or self.rng.random() < 0.3
        }

    def legacy(
        self, envelope: dict[str, Any], at: datetime, turn_id: str | None, *, wins: bool
    ) -> bytes:
        """A v1 legacy assistant append with token usage; `wins` when it is a message of its
        own (shadowing a server turn, it never wins)."""
        token_usage, totals, breakdown = self.legacy_usage()
        content = self.content(f"Answer 0: {self.rng.choice(self.config.queries)} …")
        message = MessageAppended(
            **envelope,
            type="message.appended",
            event_id=self.uuid(),
            occurred_at=at,
            turn_id=turn_id,
            role="assistant",
            content=_parts(content),
        )
        value = self.encode(message, token_usage=token_usage)
        if wins:
            key = row_key(message.thread_id, None, "assistant", message.event_id)
            self.expect.set_content(key, content)
            self.expect.count_usage(key, "message.appended", totals, breakdown)
            self.expect.keep_parts(content)
            self.turnless.append(jsonvalues.loads(value))
        return value

    def standalone_legacy(self, envelope: dict[str, Any], at: datetime) -> bytes:
        """A legacy message without turn_id: a row of its own (keyed by its event_id)."""
        self.expect.messages += 1
        kind = self.rng.random()
        if kind < 0.7:
            self.shape("legacy_turnless_v1")
        if kind < 0.4:
            return self.legacy(envelope, at, None, wins=True)
        if kind < 0.7:
            content = self.content("typed in the old frontend", tools=False)
            self.expect.keep_parts(content)
            message = MessageAppended(
                **envelope,
                type="message.appended",
                event_id=self.uuid(),
                occurred_at=at,
                role="user",
                content=_parts(content),
            )
            self.expect.set_content(
                row_key(message.thread_id, None, "user", message.event_id), content
            )
            value = self.encode(message)
            self.turnless.append(jsonvalues.loads(value))
            return value
        return self.v0_body(envelope)

    def v0_body(self, envelope: dict[str, Any]) -> bytes:
        """A v0 body: its event_id derives from the body (the text makes it unique), its
        occurred_at is the record timestamp; some are re-sent after everything else."""
        self.shape("v0_bodies")
        assistant = self.rng.random() < 0.5
        content = self.content(f"old bundle message {self.uuid()}", tools=assistant)
        body: dict[str, Any] = {
            "type": "message.appended",
            "schema_version": 0,
            "thread_id": envelope["thread_id"],
            "search_space_id": envelope["search_space_id"],
            "user_id": str(envelope["user_id"]),
            "turn_id": None,
            "role": "assistant" if assistant else "user",
            "content": content,
        }
        if assistant:
            body["token_usage"], totals, breakdown = self.legacy_usage()
        key = row_key(body["thread_id"], None, body["role"], v0_event_id(body))
        self.expect.set_content(key, content)
        if assistant:
            self.expect.count_usage(key, "message.appended", totals, breakdown)
        self.expect.keep_parts(content)
        value = json.dumps(body).encode()
        self.pinned.add(value)  # no occurred_at to re-stamp: its re-sends are the v0 retries
        if self.rng.random() < self.config.v0_resend_rate:
            self.late.append((thread_key(envelope["thread_id"]), value))
            self.shape("v0_resent_later")
            self.expect.duplicates += 1
        return value

    def poison(self, envelope: dict[str, Any]) -> bytes:
        self.expect.dead_letters += 1
        self.shape("poison")
        if self.poison_source is not None:
            context = PoisonContext(
                {**envelope, "user_id": str(envelope["user_id"])}, self.start, self.turnless
            )
            while (drawn := self.poison_source(self.rng, context)) is None:
                pass  # that kind needs what this thread lacks (e.g. a turn-less message)
            return drawn
        good = {
            **envelope,
            "user_id": str(envelope["user_id"]),
            "type": "turn.started",
            "event_id": str(self.uuid()),
            "occurred_at": self.start.isoformat(),
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


def _asked(started: TurnStarted) -> list[dict[str, Any]]:
    """The user message a turn.started stores: the query, then the documents it mentions."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": started.user_query}]
    if started.mentioned_documents:
        parts.append({"type": "mentioned-documents", "documents": started.mentioned_documents})
    return parts


def _restamped(value: bytes, later_ms: int) -> bytes:
    """The record as a retry that built its envelope again would send it: occurred_at later."""
    document = jsonvalues.loads(value)
    at = datetime.fromisoformat(document["occurred_at"]) + timedelta(milliseconds=later_ms)
    return jsonvalues.dumps({**document, "occurred_at": at.isoformat()}).encode()


def _parts(parts: list[dict[str, Any]]) -> list[ContentPart]:
    return [ContentPart.model_validate(part) for part in parts]


def _totals(calls: list[UsageCall]) -> dict[str, int]:
    return {name: sum(getattr(call, name) for call in calls) for name in USAGE_MEASURES}


def _by_model(calls: list[UsageCall]) -> dict[str, dict[str, int]]:
    sums: dict[str, dict[str, int]] = {}
    for call in calls:
        model = sums.setdefault(call.model, dict.fromkeys(USAGE_MEASURES, 0))
        for name in USAGE_MEASURES:
            model[name] += getattr(call, name)
    return sums


def plan_traffic(
    config: TrafficConfig, poison: PoisonSource | None = None
) -> tuple[list[Record], Expectation]:
    """Every record to publish, in order, and the ledger they must produce. `poison` draws
    the poison records (by default a handful of built-in kinds)."""
    planner = _Planner(config, poison)
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
            planner.shape("duplicates_right_after")
        if is_last:
            live.pop(pick)
    # v0 bodies re-sent by an old bundle after everything else: a later record timestamp.
    planner.rng.shuffle(planner.late)
    records += planner.late
    planner.expect.records = len(records)
    return records, planner.expect
