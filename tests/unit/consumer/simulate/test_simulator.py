"""The traffic plan is deterministic per seed, carries every shape the contract allows, and its
expectation (kept by construction) matches what the merge rules make of what it publishes."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer.ledger.claims import usage_totals
from consumer.ledger.decode import decode_ledger_event
from consumer.ledger.rebuild import rebuild
from consumer.simulate.config import TrafficConfig
from consumer.simulate.expectation import (
    SHAPES,
    UNKNOWN_CALL_FIELDS,
    UNKNOWN_ENVELOPE_FIELDS,
    UNKNOWN_PART_FIELD,
)
from consumer.simulate.traffic import plan_traffic
from producer import jsonvalues
from producer.decoding import decode_event
from producer.events import (
    USAGE_MEASURES,
    MessageAppended,
    Rejection,
    TurnFinalized,
    TurnStarted,
    attribution,
)
from tests.factories import START

# Published a day later: no occurred_at of the plan lies ahead of its record.
RECORD_TS = int(START.timestamp() * 1000) + 86_400_000


def test_same_seed_same_traffic() -> None:
    config = TrafficConfig(threads=20, seed=7, start=START)
    assert plan_traffic(config) == plan_traffic(config)
    other, _ = plan_traffic(TrafficConfig(threads=20, seed=8, start=START))
    assert other != plan_traffic(config)[0]


def test_plan_has_every_scenario_and_consistent_counts() -> None:
    records, expect = plan_traffic(
        TrafficConfig(threads=200, seed=3, poison_rate=0.05, start=START)
    )
    decoded = [decode_event(value, timestamp_ms=RECORD_TS) for _, value in records]
    started = {
        (e.thread_id, e.turn_id)
        for e in decoded
        if isinstance(e, TurnStarted) and e.turn_id != "poison:1"  # the tenant-mismatch poison
    }
    assert len(started) == 200 * 5
    assert expect.records == len(records)
    assert expect.duplicates == len(records) - len(set(records))
    assert expect.duplicates == sum(
        expect.shapes[name]
        for name in ("duplicates_right_after", "retries_later", "v0_resent_later")
    )
    assert expect.threads == 200
    rejected = [r for r in decoded if isinstance(r, Rejection)]
    assert 0 < len(rejected) <= expect.dead_letters == expect.shapes["poison"]
    # finalize before start happens for some turn (shuffles)
    first_seen: dict[tuple[int, str | None], str] = {}
    for event in decoded:
        if isinstance(event, TurnStarted | TurnFinalized):
            first_seen.setdefault((event.thread_id, event.turn_id), event.type)
    assert "turn.finalized" in collections.Counter(first_seen.values())
    assert expect.usage_rows > 0 and expect.total_cost_micros > 0
    assert expect.messages >= 2 * 200 * 5


def test_poison_rate_is_poison_records_per_turn_at_the_end_of_each_thread() -> None:
    """1.1 a turn over 5 turns: every thread ends with 5 or 6 poison records, none re-sent,
    30 % of the records (the bench's poison backlog); no thread is capped at one."""
    records, expect = plan_traffic(TrafficConfig(threads=300, seed=5, poison_rate=1.1, start=START))
    threads: dict[bytes, list[bytes]] = collections.defaultdict(list)
    for key, value in records:
        threads[key].append(value)

    def is_poison(value: bytes) -> bool:
        decoded = decode_event(value, timestamp_ms=RECORD_TS)
        return isinstance(decoded, Rejection) or getattr(decoded, "turn_id", None) == "poison:1"

    counts: collections.Counter[int] = collections.Counter()
    for values in threads.values():
        # v0 bodies re-sent after everything else are copies of earlier records: set aside.
        # (Two poison records may be equal bytes: those are each counted.)
        poison = [is_poison(v) for i, v in enumerate(values) if is_poison(v) or v not in values[:i]]
        tail = poison.index(True)
        assert all(poison[tail:]), "a thread's poison records are its last"
        counts[len(poison) - tail] += 1
    assert set(counts) == {5, 6}
    assert sum(n * k for n, k in counts.items()) == expect.dead_letters
    assert 0.27 < expect.dead_letters / len(records) < 0.33


def _legacy_shape(event: MessageAppended) -> str:
    assert event.token_usage is not None
    breakdown = event.token_usage.usage
    if breakdown is None:
        return "legacy_usage_null"
    if not breakdown:
        return "legacy_usage_empty"
    sent = [entry.model_dump(exclude_unset=True) for entry in breakdown.values()]
    full = all(all(entry.get(name) is not None for name in USAGE_MEASURES) for entry in sent)
    return "legacy_usage_full" if full else "legacy_usage_partial"


def test_default_traffic_publishes_every_shape_it_counts() -> None:
    """The counts in Expectation.shapes (what `make demo` shows) are what is in the bytes."""
    records, expect = plan_traffic(TrafficConfig(threads=200, seed=5, start=START))
    assert all(expect.shapes[name] > 0 for name in SHAPES), expect.shapes
    distinct = list(dict.fromkeys(value for _, value in records))
    found: collections.Counter[str] = collections.Counter()
    for value in distinct:
        event = decode_event(value, timestamp_ms=RECORD_TS)
        if isinstance(event, Rejection):
            continue
        document: dict[str, Any] = jsonvalues.loads(value)
        if isinstance(event, MessageAppended) and event.token_usage is not None:
            found[_legacy_shape(event)] += 1
        found["v0_bodies"] += document.get("schema_version") == 0
        found["unknown_envelope_fields"] += all(f in document for f in UNKNOWN_ENVELOPE_FIELDS)
        parts = document.get("content") or []
        found["unknown_part_fields"] += sum(UNKNOWN_PART_FIELD in part for part in parts)
        calls = (document.get("usage") or {}).get("calls", [])
        found["unknown_call_fields"] += sum(UNKNOWN_CALL_FIELDS[0] in call for call in calls)
    for name, count in found.items():
        assert expect.shapes[name] == count, name
    # v0 bodies re-sent after everything else: the plan's tail, copies of earlier records.
    tail = records[len(records) - expect.shapes["v0_resent_later"] :]
    head = set(records[: len(records) - len(tail)])
    assert all(record in head and b'"schema_version": 0' in record[1] for record in tail)
    # Retries: copies that come back after other records (not right after their original).
    seen: set[tuple[bytes, bytes]] = set()
    later = 0
    for previous, record in zip([None, *records], records, strict=False):
        later += record in seen and record != previous
        seen.add(record)
    assert later > len(tail)


def test_expectation_agrees_with_the_merge_rules() -> None:
    """The ledger the merge rules build from the plan (each record published a millisecond
    after the one before, so a re-sent v0 body is a later copy) is the expected one."""
    records, expect = plan_traffic(
        TrafficConfig(threads=120, seed=11, duplicate_rate=0.2, shuffle_rate=0.4, start=START)
    )
    decoded = [
        decode_ledger_event(value, timestamp_ms=RECORD_TS + offset)
        for offset, (_, value) in enumerate(records)
    ]
    ledger = rebuild([event for event in decoded if not isinstance(event, Rejection)])
    per_model: dict[str, dict[str, int]] = {}
    for row in ledger.usage.values():
        for model, share in attribution(usage_totals(row), row.model_breakdown).items():
            sums = per_model.setdefault(model, dict.fromkeys(USAGE_MEASURES, 0))
            for name in USAGE_MEASURES:
                sums[name] += share[name]
    kept = dict.fromkeys(expect.kept_unknown_fields, 0)
    for row in ledger.usage.values():
        for call in jsonvalues.loads(row.call_details)["calls"]:
            for name in UNKNOWN_CALL_FIELDS:
                kept[f"call_details.{name}"] += call.get(name, 0)
    for message in ledger.messages.values():
        kept[f"content.{UNKNOWN_PART_FIELD}"] += sum(
            UNKNOWN_PART_FIELD in p for p in jsonvalues.loads(message.content)
        )
    assert (len(ledger.threads), len(ledger.messages), len(ledger.usage)) == (
        expect.threads,
        expect.messages,
        expect.usage_rows,
    )
    assert per_model == expect.per_model
    assert "(unattributed)" in per_model
    assert kept == expect.kept_unknown_fields
    assert all(kept.values())


def test_a_large_default_plan_ends_about_now_and_nothing_is_in_the_future() -> None:
    """Without a start, thread i no longer starts i seconds after now: 3,700 threads used to
    reach an hour ahead of the publish time (occurred_at_in_future)."""
    records, _ = plan_traffic(TrafficConfig(threads=3700, turns_per_thread=1, poison_rate=0))
    now = datetime.now(UTC)
    published_ms = int(now.timestamp() * 1000)
    events = [decode_event(value, timestamp_ms=published_ms) for _, value in records]
    assert [e for e in events if isinstance(e, Rejection)] == []
    latest = max(e.occurred_at for e in events if not isinstance(e, Rejection))
    assert now - timedelta(minutes=5) < latest <= now


def test_legacy_shape_rates_must_fit_in_one() -> None:
    with pytest.raises(ValueError, match="exceed 1"):
        TrafficConfig(legacy_partial_rate=0.6, legacy_empty_rate=0.3, legacy_null_rate=0.2)


def test_records_of_a_thread_share_its_key() -> None:
    records, _ = plan_traffic(TrafficConfig(threads=10, seed=1, poison_rate=0, start=START))
    for key, value in records:
        event = decode_event(value, timestamp_ms=RECORD_TS)
        assert not isinstance(event, Rejection)
        assert key == str(event.thread_id).encode()
