"""Realistic, seeded chat traffic and the ledger it must produce.

`plan_traffic(TrafficConfig(...))` returns the records to publish (key, value) in publish order
and an `Expectation`: the ledger summary that applying them must yield. The expectation is
kept by construction (what each scenario creates), not by running the merge rules, so it is an
independent check of the consumer; per model it splits each usage row with
`producer.events.attribution` (docs/contract.md#per-model-attribution), as `token-ledger usage
--by model` does. What the plan draws from: config.py.

Scenarios per thread: turns (started + finalized, with text and tool-call parts and 1-3 LLM
calls from a model mix), some finalized twice (content of the later, cost of the first), legacy
appends that shadow a server turn (never win), standalone legacy messages (v1 and v0 bodies),
shuffles inside a thread (finalize before start), and poison records that must each end in the
dead-letter topic. Every shape the contract allows (docs/contract.md), each at its own rate:

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
from datetime import timedelta
from typing import Any

from consumer.simulate.config import (
    FINALIZE_GAP_MS,
    LEGACY_JITTER_MS,
    NO_TEXT_RESPONSE,
    START_GAP_MS,
    PoisonContext,
    PoisonSource,
    Record,
    TrafficConfig,
    asked,
    by_model,
    parts,
    restamped,
    totals,
)
from consumer.simulate.expectation import Expectation, row_key
from consumer.simulate.shapes import LegacyShapes
from producer.client import thread_key
from producer.events import (
    TurnFinalized,
    TurnStarted,
    TurnUsage,
)


class _Planner(LegacyShapes):
    def thread(self, index: int) -> list[Record]:
        """One thread's records in its own order; its poison records, if any, come last."""
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
            self.expect.set_content(row_key(thread_id, turn_id, "user", None), asked(started))
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
                    content=parts(content),
                    usage=TurnUsage(calls=these_calls) if these_calls else None,
                )
                records.append(self.encode(finalized))
                if attempt < finalizes - 1:  # re-stamped later, it would win the content
                    pinned.add(records[-1])
            self.expect.keep_parts(content)  # the later finalize's content wins
            answered = row_key(thread_id, turn_id, "assistant", None)
            self.expect.set_content(answered, content or [NO_TEXT_RESPONSE])
            if calls:  # the first finalize's cost is authoritative
                self.expect.count_usage(answered, "turn.finalized", totals(calls), by_model(calls))
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
        # poison_rate poison records per turn, on average: the whole part of rate x turns in
        # every thread, and one more with the chance of its fraction.
        expected = cfg.poison_rate * cfg.turns_per_thread
        poisoned = int(expected)
        if rng.random() < expected - poisoned:
            poisoned += 1
        if poisoned:
            records += [self.poison(envelope) for _ in range(poisoned)]
            self.poison_counts[index] = poisoned
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
                due[later].append(restamped(value, self.rng.randint(1, 3_000)))
                self.expect.restamped += 1
        retried: list[bytes] = []
        for position, value in enumerate(records):
            retried += [*due[position], value]
        return retried + due[len(records)]

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
        left = len(per_thread[thread]) - cursors[thread]
        is_last = left == 0
        # Poison (a thread's last records) is never re-sent: each one is exactly one dead letter.
        is_poison = left < planner.poison_counts.get(thread, 0)
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
