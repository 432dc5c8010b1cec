"""Budgets and spend alerts (docs/contract.md#budgets-and-spend-alerts) through the real consumer
on real Kafka and PostgreSQL: one record per crossing whatever is replayed, redelivered or
killed; a correction withdraws it and a later crossing is a new one; UTC days and months."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema

from consumer.billing.relay import BILLING_PARTITIONS
from producer.budget_alerts import BudgetAlertEvent
from producer.client import ensure_topic, thread_key
from producer.events import AnyEvent, encode_event
from tests.factories import SPACE, T0, USER, appended, call, finalized, started
from tests.integration.harness import ConsumerProcess, Stack, said, wait_for

CLOUDEVENTS = json.loads((Path(__file__).parents[1] / "cloudevents-1.0.schema.json").read_text())
OURS = BudgetAlertEvent.model_json_schema(mode="validation")


def records_of(*events: AnyEvent) -> list[tuple[bytes, bytes]]:
    return [(thread_key(event.thread_id), encode_event(event)) for event in events]


def seconds_to(moment: datetime) -> float:
    """`seconds` for the factories (which count from T0) of an instant."""
    return (moment - T0).total_seconds()


async def add_budget(stack: Stack, period: str, cost: int, thresholds: str, **scope: Any) -> int:
    """A budget written as `budget set` stores it (the tests of the command are below)."""
    conn = await stack.connect()
    try:
        budget_id: int = await conn.fetchval(
            "INSERT INTO budgets (search_space_id, user_id, period, cost_micros_limit, thresholds)"
            " VALUES ($1, $2, $3, $4, $5::smallint[]) RETURNING id",
            scope.get("space", SPACE),
            scope.get("user"),
            period,
            cost,
            [int(t) for t in thresholds.split(",")],
        )
    finally:
        await conn.close()
    return budget_id


async def alerts(stack: Stack) -> list[dict[str, Any]]:
    """The budget topic's records as CloudEvents (validated), one per id: every copy of an id
    (the relay is at-least-once) is the identical record."""
    seen: dict[str, bytes] = {}
    events = []
    for record in await stack.budget_alerts():
        event: dict[str, Any] = json.loads(record.value)
        jsonschema.validate(event, CLOUDEVENTS)
        jsonschema.validate(event, OURS)
        assert (
            record.key
            == event["subject"].encode()
            == str(event["data"]["search_space_id"]).encode()
        )
        assert dict(record.headers)["content-type"] == b"application/cloudevents+json"
        if event["id"] in seen:
            assert seen[event["id"]] == record.value
            continue
        seen[event["id"]] = record.value
        events.append(event)
    return events


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, int, int, str]]:
    """(period start, measure, threshold, sequence, crossed|withdrawn) in topic order."""
    return [
        (
            e["data"]["period_start"][:10],
            e["data"]["measure"],
            e["data"]["threshold"],
            e["data"]["sequence"],
            e["type"].rpartition("_")[2],
        )
        for e in events
    ]


def assigned(member: ConsumerProcess) -> list[int]:
    """The partitions the member was last assigned, from its log."""
    owned: list[int] = []
    for line in member.logs().splitlines():
        if '"partitions assigned"' in line:
            owned = sorted(json.loads(line)["partitions"])
    return owned


def consume_until_idle(stack: Stack, **env: str) -> None:
    run = stack.cli("consume", "--until-idle", **env)
    assert run.returncode == 0, run.stderr


async def test_a_crossing_is_one_record_through_a_kill_9_mid_batch_and_a_replay_from_offset_0(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    budget_id = await add_budget(stack, "month", 1000, "80,100")
    # 200 turns of 5 micros in 200 threads over the 3 partitions: the month reaches 800 (80 %)
    # and 1000 (100 %) somewhere in the middle of many small batches.
    turns = [
        finalized(thread_id=n, turn_id=f"{n}:1", calls=[call(cost=5)], seconds=n)
        for n in range(1, 201)
    ]
    await stack.publish(records_of(*turns))
    first = ConsumerProcess(stack.env(LEDGER_MAX_BATCH="3"), tmp_path / "first.log").start()
    processes.append(first)

    async def some_applied() -> bool:
        return sum((await stack.stored_offsets()).values()) >= 60

    # Killed at once: batches of 3 keep a transaction in flight nearly all the time.
    await wait_for(some_applied, within=60, what="60 turns applied", context=first.logs)
    first.kill()
    assert not await stack.caught_up(), "killed after the stream ended: not mid-stream"
    consume_until_idle(stack)
    crossed = summary(await alerts(stack))
    assert sorted(crossed) == [
        ("2026-11-01", "cost_micros", 80, 1, "crossed"),
        ("2026-11-01", "cost_micros", 100, 1, "crossed"),
    ]
    event = (await alerts(stack))[0]
    assert event["id"] == f"{budget_id}:2026-11-01:cost_micros:{event['data']['threshold']}:1"
    assert event["data"]["limit"] == 1000 and event["data"]["period"] == "month"
    assert event["data"]["user_id"] is None
    assert event["data"]["usage_revision"].endswith(":1")  # the usage row that crossed it

    assert stack.cli("replay", "--to-offset", "0").returncode == 0
    consume_until_idle(stack)
    assert summary(await alerts(stack)) == crossed
    verified = stack.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # verify judges the stored states against the ledger: one tampered with is a difference.
    conn = await stack.connect()
    try:
        await conn.execute(
            "UPDATE budget_states SET crossed = false, sequence = 2 WHERE threshold = 80"
        )
    finally:
        await conn.close()
    tampered = stack.cli("verify")
    assert tampered.returncode == 1
    assert f"budget {budget_id} period 2026-11-01 cost_micros 80 %" in tampered.stdout


async def test_a_cheaper_correction_withdraws_the_crossing_and_a_later_turn_crosses_again(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await add_budget(stack, "day", 1000, "80", user=USER)
    await stack.publish(records_of(started(), appended(cost=850, seconds=5)))
    consume_until_idle(stack)
    # The server's finalize supersedes the legacy append (500 < 800), then another turn of the
    # same thread (same partition, one record per batch: in this order) brings the day to 900.
    await stack.publish(
        records_of(
            finalized(calls=[call(cost=500)], seconds=10),
            finalized(turn_id="4242:2", calls=[call(cost=400)], seconds=20),
        )
    )
    consume_until_idle(stack, LEDGER_MAX_BATCH="1")
    events = await alerts(stack)
    assert summary(events) == [
        ("2026-11-26", "cost_micros", 80, 1, "crossed"),
        ("2026-11-26", "cost_micros", 80, 2, "withdrawn"),
        ("2026-11-26", "cost_micros", 80, 3, "crossed"),
    ]
    assert [e["data"]["spend"] for e in events] == [850, 500, 900]
    assert events[0]["data"]["user_id"] == str(USER)
    # The withdrawal names the revision that took the cost back (the finalize's, after the
    # reversal of the append's time), the new crossing the new turn's first revision.
    assert events[1]["data"]["usage_revision"] == events[0]["data"]["usage_revision"][:-1] + "3"
    assert events[2]["data"]["usage_revision"].endswith(":1")


async def test_usage_at_the_last_millisecond_of_a_month_and_at_midnight_is_two_days_and_months(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    day = await add_budget(stack, "day", 1000, "50,100")
    month = await add_budget(stack, "month", 1000, "50,100")
    before = datetime(2026, 11, 30, 23, 59, 59, 999000, tzinfo=UTC)
    after = datetime(2026, 12, 1, tzinfo=UTC)
    await stack.publish(
        records_of(
            finalized(
                thread_id=1, turn_id="1:1", calls=[call(cost=600)], seconds=seconds_to(before)
            ),
            finalized(
                thread_id=2, turn_id="2:1", calls=[call(cost=600)], seconds=seconds_to(after)
            ),
        )
    )
    consume_until_idle(stack)
    by_budget = Counter(
        (e["data"]["budget_id"], e["data"]["period_start"], e["data"]["threshold"])
        for e in await alerts(stack)
    )
    # 600 of 1000 on each side of midnight: 50 % of each day and of each month, never 100 %.
    assert by_budget == {
        (day, "2026-11-30T00:00:00Z", 50): 1,
        (day, "2026-12-01T00:00:00Z", 50): 1,
        (month, "2026-11-01T00:00:00Z", 50): 1,
        (month, "2026-12-01T00:00:00Z", 50): 1,
    }


async def test_two_consumers_writing_one_space_from_two_partitions_emit_one_record_per_crossing(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=2)
    await add_budget(stack, "total", 2000, ",".join(str(t) for t in range(10, 101, 10)))
    turns = [
        finalized(thread_id=n, turn_id=f"{n}:1", calls=[call(cost=10)], seconds=n)
        for n in range(1, 201)
    ]
    await stack.create_topic()
    members = [
        ConsumerProcess(stack.env(LEDGER_MAX_BATCH="2"), tmp_path / f"member-{n}.log").start()
        for n in range(2)
    ]
    processes.extend(members)

    async def one_partition_each() -> bool:
        owned = [assigned(member) for member in members]
        return sorted(owned) == [[0], [1]]

    # Both members own a partition before any usage exists: they apply it at the same time.
    await wait_for(one_partition_each, within=60, what="a partition each", context=members[1].logs)
    await stack.publish(records_of(*turns))
    await wait_for(
        stack.caught_up, within=120, what="both members to drain", context=members[0].logs
    )

    async def ten_published() -> bool:
        return len(await alerts(stack)) >= 10

    await wait_for(ten_published, within=30, what="the ten crossings published")
    assert sorted(owner for member in members for owner in assigned(member)) == [0, 1]
    events = await alerts(stack)
    assert sorted(summary(events)) == [
        ("0001-01-01", "cost_micros", t, 1, "crossed") for t in range(10, 101, 10)
    ]
    assert [e["data"]["spend"] >= e["data"]["threshold"] * 20 for e in events] == [True] * 10


def refused(stack: Stack, *args: str) -> str:
    """The one line `token-ledger ARGS` refuses with (exit 2)."""
    run = stack.cli(*args)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return said(lines[0])


async def test_budget_set_list_and_delete_and_a_changed_limit_judges_the_current_period_at_once(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    just_now = seconds_to(datetime.now(UTC)) - 60
    await stack.publish(records_of(finalized(calls=[call(cost=12345)], seconds=just_now)))
    consume_until_idle(stack)

    space = str(SPACE)
    assert (
        "--cost-micros -5: a limit is a positive integer of at most 9223372036854775807"
        in refused(
            stack, "budget", "set", "--space", space, "--period", "day", "--cost-micros", "-5"
        )
    )
    assert "1001 % is not within 1 .. 1000 %" in refused(
        stack, "budget", "set", "--space", space, "--period", "day", "--tokens", "9",
        "--thresholds", "50,1001",
    )  # fmt: skip
    assert "search space 999 is unknown" in refused(
        stack, "budget", "set", "--space", "999", "--period", "day", "--tokens", "9"
    )
    assert "give a limit" in refused(stack, "budget", "set", "--space", space, "--period", "day")

    created = stack.cli(
        "budget", "set", "--space", space, "--period", "total", "--cost-micros", "100000",
        "--thresholds", "50,80",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    budget_id = int(created.stdout)

    def listed() -> dict[str, Any]:
        run = stack.cli("budget", "list", "--space", space, "--format", "json")
        assert run.returncode == 0, run.stderr
        (row,) = [json.loads(line) for line in run.stdout.splitlines()]
        assert isinstance(row, dict)
        return row

    assert listed() == {
        "id": budget_id,
        "search_space_id": SPACE,
        "user_id": None,
        "period": "total",
        "period_start": "0001-01-01T00:00:00Z",
        "cost_micros_limit": 100000,
        "total_tokens_limit": None,
        "thresholds": [50, 80],
        "cost_micros": 12345,
        "total_tokens": 150,
        "crossed": [],
    }
    # The same scope and period: the same budget, its limits replaced and judged at once.
    lowered = stack.cli(
        "budget", "set", "--space", space, "--period", "total", "--cost-micros", "15000"
    )
    assert int(lowered.stdout) == budget_id
    assert listed()["crossed"] == ["cost_micros:50", "cost_micros:80"]
    table = stack.cli("budget", "list")
    assert table.returncode == 0 and "cost_micros:50, cost_micros:80" in table.stdout

    consume_until_idle(stack)  # its relay publishes what the change wrote
    events = await alerts(stack)
    # Thresholds default to 50, 80, 100: 12345 of 15000 is 82 %.
    assert sorted(summary(events)) == [
        ("0001-01-01", "cost_micros", 50, 1, "crossed"),
        ("0001-01-01", "cost_micros", 80, 1, "crossed"),
    ]
    assert {e["data"]["usage_revision"] for e in events} == {None}
    assert {e["data"]["spend"] for e in events} == {12345}

    assert stack.cli("budget", "delete", str(budget_id)).returncode == 0
    assert f"no budget {budget_id}" in refused(stack, "budget", "delete", str(budget_id))
    assert stack.cli("budget", "list", "--format", "json").stdout == ""


async def test_a_budget_topic_that_may_not_be_created_holds_back_alerts_not_billing(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    config = {"max.message.bytes": "2000000"}  # sized for the source's largest record
    await ensure_topic(stack.bootstrap, stack.dlq_topic, partitions=1, config=config)
    # Every topic but the budget one.
    await ensure_topic(
        stack.bootstrap, stack.billing_topic, partitions=BILLING_PARTITIONS, config=config
    )
    await add_budget(stack, "month", 10, "50")
    await stack.publish(records_of(finalized(thread_id=1, turn_id="1:1", calls=[call(cost=8)])))
    consumer = ConsumerProcess(
        stack.env(LEDGER_CREATE_TOPICS="false"), tmp_path / "consumer.log"
    ).start()
    processes.append(consumer)

    async def billed() -> bool:
        return len(await stack.billing_records()) == 1

    await wait_for(billed, within=60, what="the revision billed", context=consumer.logs)

    async def budget_topic_named() -> bool:
        return any(
            stack.budget_topic in line and "LEDGER_BUDGET_TOPIC" in line
            for line in consumer.logs().splitlines()
        )

    await wait_for(budget_topic_named, within=60, what="the budget topic named")
    conn = await stack.connect()
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM budget_alert_outbox WHERE published_at IS NULL"
            )
            == 1
        )
    finally:
        await conn.close()
    assert consumer.terminate()[0] == 0
