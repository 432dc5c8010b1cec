"""The traffic plan is deterministic per seed, and its expectation matches what it publishes."""

from __future__ import annotations

import collections
from datetime import UTC, datetime

from producer.events import Rejection, TurnFinalized, TurnStarted, decode_event
from producer.simulator import TrafficConfig, plan_traffic

START = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
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
    assert expect.threads == 200
    rejected = [r for r in decoded if isinstance(r, Rejection)]
    assert 0 < len(rejected) <= expect.dead_letters
    # finalize before start happens for some turn (shuffles)
    first_seen: dict[tuple[int, str | None], str] = {}
    for event in decoded:
        if isinstance(event, TurnStarted | TurnFinalized):
            first_seen.setdefault((event.thread_id, event.turn_id), event.type)
    assert "turn.finalized" in collections.Counter(first_seen.values())
    assert expect.usage_rows > 0 and expect.total_cost_micros > 0
    assert expect.messages >= 2 * 200 * 5


def test_records_of_a_thread_share_its_key() -> None:
    records, _ = plan_traffic(TrafficConfig(threads=10, seed=1, poison_rate=0, start=START))
    for key, value in records:
        event = decode_event(value, timestamp_ms=RECORD_TS)
        assert not isinstance(event, Rejection)
        assert key == str(event.thread_id).encode()
