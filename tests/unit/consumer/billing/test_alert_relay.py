"""The budget alerts' share of a relay pass (consumer/billing/alert_relay.py) with a small
fake connection: each state's oldest pending alert only, as the identical CloudEvent bytes every
time; an alert the topic refuses holds back its budget's later alerts; marked only when acked."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from consumer.billing.alert_relay import AlertRelay
from consumer.http.metrics import LedgerMetrics

START = datetime(2026, 12, 1, tzinfo=UTC)


def alert(id_: int, budget: int, threshold: int, sequence: int, space: int = 7) -> dict[str, Any]:
    return {
        "id": id_,
        "budget_id": budget,
        "search_space_id": space,
        "user_id": None,
        "period": "month",
        "period_start": START,
        "measure": "cost_micros",
        "threshold": threshold,
        "sequence": sequence,
        "crossed": sequence % 2 == 1,
        "spend": 900,
        "limit_value": 1000,
        "usage_id": 12,
        "usage_revision": 3,
        "created_at": datetime(2026, 12, 3, 4, 5, 6, 789, tzinfo=UTC),
    }


class FakeConnection:
    """Pending rows in id order, filtered by held budgets as the query filters them."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.marked: list[int] = []

    async def fetch(self, _query: str, limit: int, held: list[int]) -> list[dict[str, Any]]:
        pending = [r for r in self.rows if r["id"] not in self.marked]
        return [r for r in pending if r["budget_id"] not in held][:limit]

    async def execute(self, _query: str, ids: list[int]) -> None:
        self.marked += ids


class FakeTopic:
    def __init__(self, *answers: BaseException | None) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[bytes, bytes]] = []

    async def __call__(self, records: list[tuple[bytes, bytes]]) -> list[BaseException | None]:
        self.sent += records
        return [self.answers.pop(0) if self.answers else None for _ in records]


async def test_a_pass_sends_each_states_oldest_alert_keyed_by_space_and_marks_what_was_acked() -> (
    None
):
    conn = FakeConnection([alert(1, 3, 80, 1), alert(2, 3, 80, 2), alert(3, 3, 100, 1)])
    topic = FakeTopic()
    relay = AlertRelay(topic, batch=10)
    done = await relay.publish_pending(conn)
    assert conn.marked == [1, 3]  # sequence 2 of threshold 80 waits for the next pass
    assert done.published == [("crossed", "cost_micros", 80), ("crossed", "cost_micros", 100)]
    key, value = topic.sent[0]
    event = json.loads(value)
    assert key == b"7" and event["id"] == "3:2026-12-01:cost_micros:80:1"
    assert event["type"] == "ledger.budget.threshold_crossed"
    assert event["time"] == "2026-12-03T04:05:06.000789Z"
    assert event["data"]["usage_revision"] == "12:3" and event["data"]["limit"] == 1000
    again = await relay.publish_pending(conn)
    assert conn.marked == [1, 3, 2] and again.published == [("withdrawn", "cost_micros", 80)]
    assert topic.sent[2][1] != topic.sent[0][1]


async def test_a_refused_alert_holds_back_its_budget_and_a_retriable_failure_marks_nothing() -> (
    None
):
    conn = FakeConnection([alert(1, 3, 80, 1), alert(2, 4, 80, 1), alert(3, 3, 100, 1)])
    relay = AlertRelay(FakeTopic(TopicAuthorizationFailedError()), batch=10)
    done = await relay.publish_pending(conn)
    assert conn.marked == [2, 3]  # budget 3's threshold 100 was sent in the same pass
    assert relay.refused == {
        3: ("3:2026-12-01:cost_micros:80:1", "refused: TopicAuthorizationFailedError")
    }
    assert len(done.published) == 2
    conn.rows.append(alert(4, 3, 50, 1))
    assert (await relay.publish_pending(conn)).published == []  # budget 3 waits

    failing = AlertRelay(FakeTopic(KafkaTimeoutError()), batch=10)
    fresh = FakeConnection([alert(1, 3, 80, 1)])
    with pytest.raises(KafkaTimeoutError):
        await failing.publish_pending(fresh)
    assert fresh.marked == []


def test_the_alert_counter_has_no_tenant_label() -> None:
    metrics = LedgerMetrics()
    metrics.budget_alerts.labels("crossed", "cost_micros", "80").inc()
    (family,) = [m for m in metrics.registry.collect() if m.name == "token_ledger_budget_alerts"]
    assert {tuple(sorted(s.labels)) for s in family.samples} == {("kind", "measure", "threshold")}
