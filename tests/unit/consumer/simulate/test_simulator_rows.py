"""The simulator's row-by-row expectation (Expectation.rows: every message's content and
usage, kept by construction) is what the merge rules make of the plan, re-stamped retries
included; the chaos run holds the database to it."""

from __future__ import annotations

from typing import Any

from consumer.ledger.decode import decode_ledger_event
from consumer.ledger.rebuild import rebuild
from consumer.simulate.config import TrafficConfig
from consumer.simulate.expectation import ExpectedRow, RowKey, row_key
from consumer.simulate.traffic import plan_traffic
from producer import jsonvalues
from producer.events import Rejection
from tests.factories import START

RECORD_TS = int(START.timestamp() * 1000) + 86_400_000


def _rows(config: TrafficConfig) -> tuple[dict[RowKey, ExpectedRow], dict[RowKey, ExpectedRow]]:
    records, expect = plan_traffic(config)
    decoded = [
        decode_ledger_event(value, timestamp_ms=RECORD_TS + offset)
        for offset, (_, value) in enumerate(records)
    ]
    ledger = rebuild([event for event in decoded if not isinstance(event, Rejection)])
    built: dict[RowKey, ExpectedRow] = {}
    for key, message in ledger.messages.items():
        # As the database gives content back (exact numbers as Decimal).
        content: list[dict[str, Any]] = jsonvalues.loads(message.content)
        built[row_key(key.thread_id, key.turn_id, key.role, key.origin_event_id)] = ExpectedRow(
            content
        )
    for key, usage in ledger.usage.items():
        built[row_key(key.thread_id, key.turn_id, key.role, key.origin_event_id)].usage = (
            usage.source,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.cost_micros,
        )
    return built, expect.rows


def test_expected_rows_agree_with_the_merge_rules_with_restamped_retries() -> None:
    config = TrafficConfig(
        threads=150,
        seed=21,
        duplicate_rate=0.2,
        legacy_rate=0.25,
        second_finalize_rate=0.2,
        shuffle_rate=0.4,
        restamp_rate=0.1,
        poison_rate=0,
        start=START,
    )
    built, expected = _rows(config)
    assert built.keys() == expected.keys()
    assert [key for key in built if built[key] != expected[key]] == []
    assert sum(row.usage is not None for row in expected.values()) > 100


def test_restamped_retries_are_differing_copies() -> None:
    records, expect = plan_traffic(TrafficConfig(threads=50, seed=4, restamp_rate=0.2, start=START))
    assert expect.restamped > 0
    # Exact copies are counted as duplicates; a re-stamped copy is a record of its own.
    assert expect.duplicates == len(records) - len(set(records))
