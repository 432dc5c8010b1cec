"""The billing stream (docs/contract.md#billing-stream) end to end: usage revisions written with the usage in
one transaction, relayed to the billing topic as CloudEvents, at least once and in order per
message; replays publish nothing new; `usage` in every format equals the ledger."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema

from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer.billing import BillingEvent
from producer.client import thread_key
from producer.events import USAGE_MEASURES, AnyEvent, encode_event
from tests.factories import START, appended, call, finalized, started
from tests.integration.harness import ConsumerProcess, Stack, wait_for

CLOUDEVENTS = json.loads((Path(__file__).parents[1] / "cloudevents-1.0.schema.json").read_text())
OURS = BillingEvent.model_json_schema(mode="validation")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
MEASURES = USAGE_MEASURES


def records_of(*events: AnyEvent) -> list[tuple[bytes, bytes]]:
    return [(thread_key(event.thread_id), encode_event(event)) for event in events]


def checked(record: Any) -> dict[str, Any]:
    """A billing record's CloudEvent, validated against CloudEvents 1.0 and our schema."""
    event: dict[str, Any] = json.loads(record.value)
    jsonschema.validate(event, CLOUDEVENTS)
    jsonschema.validate(event, OURS)
    assert RFC3339.match(event["time"]), event["time"]
    assert record.key == str(event["data"]["thread_id"]).encode()
    return event


def consume_until_idle(stack: Stack, **env: str) -> None:
    run = stack.cli("consume", "--until-idle", **env)
    assert run.returncode == 0, run.stderr


async def ledger_usage(stack: Stack) -> dict[int, dict[str, int]]:
    conn = await stack.connect()
    try:
        rows = await conn.fetch(f"SELECT id, revision, {', '.join(MEASURES)} FROM token_usage")
    finally:
        await conn.close()
    return {r["id"]: dict(r) for r in rows}


def by_usage(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    revisions: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        revisions[int(event["id"].partition(":")[0])].append(event)
    return revisions


def assert_deltas_add_up(events: list[dict[str, Any]], ledger: dict[int, dict[str, int]]) -> None:
    """Deduplicated by id, the revisions of every usage row are 1..n and their deltas sum to
    the row; each revision's full values are the running sum."""
    unique = {event["id"]: event for event in events}
    revisions = by_usage(list(unique.values()))
    assert set(revisions) == set(ledger)
    for usage_id, events_ in revisions.items():
        events_.sort(key=lambda e: e["data"]["revision"])
        assert [e["data"]["revision"] for e in events_] == list(
            range(1, ledger[usage_id]["revision"] + 1)
        )
        running = dict.fromkeys(MEASURES, 0)
        for event in events_:
            for m in MEASURES:
                running[m] += event["data"]["delta"][m]
                assert event["data"][m] == running[m], event
        assert running == {m: ledger[usage_id][m] for m in MEASURES}


async def test_a_legacy_append_then_the_servers_finalize_at_the_same_instant_is_revision_2(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    """Same user, tenant and time: the attribution stays, and revision 2 bills the change."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(records_of(started(), appended(cost=777, seconds=5)))
    consume_until_idle(stack)
    await stack.publish(records_of(finalized(calls=[call(cost=500)], seconds=5)))
    consume_until_idle(stack)

    events = [checked(r) for r in await stack.billing_records()]
    assert [(e["data"]["revision"], e["data"]["source"]) for e in events] == [
        (1, "message.appended"),
        (2, "turn.finalized"),
    ]
    first, second = events
    assert first["data"]["delta"]["cost_micros"] == 777
    assert second["data"]["delta"]["cost_micros"] == 500 - 777  # the smaller server cost won
    assert second["data"]["reverses"] is None
    assert second["id"] == f"{first['id'].partition(':')[0]}:2"
    assert second["subject"] == str(second["data"]["search_space_id"])
    assert second["data"]["role"] == "assistant" and second["data"]["turn_id"] is not None
    assert_deltas_add_up(events, await ledger_usage(stack))


async def test_a_later_finalize_reverses_the_legacy_revision_then_bills_its_own(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    """The winning event's time moves: revision 2 takes back revision 1 at revision 1's time,
    revision 3 bills the finalize at its own (docs/contract.md#billing-attribution)."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(records_of(started(), appended(cost=777, seconds=5)))
    consume_until_idle(stack)
    await stack.publish(records_of(finalized(calls=[call(cost=500)], seconds=10)))
    consume_until_idle(stack)

    events = [checked(r) for r in await stack.billing_records()]
    assert [
        (
            e["data"]["revision"],
            e["data"]["source"],
            e["data"]["reverses"],
            e["data"]["delta"]["cost_micros"],
            e["data"]["cost_micros"],
        )
        for e in events
    ] == [
        (1, "message.appended", None, 777, 777),
        (2, "message.appended", 1, -777, 0),
        (3, "turn.finalized", None, 500, 500),
    ]
    first, reversal, third = events
    assert reversal["time"] == first["time"] != third["time"]
    assert reversal["data"]["model_breakdown"] == {}
    assert_deltas_add_up(events, await ledger_usage(stack))


async def test_random_traffic_bills_exactly_the_ledger_and_a_replay_publishes_nothing(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(
        TrafficConfig(
            threads=40, turns_per_thread=4, seed=31, poison_rate=0, legacy_rate=0.4, start=START
        )
    )
    # In three drains: a later finalize supersedes an earlier drain's legacy usage.
    for part in (records[: len(records) // 3], records[len(records) // 3 :]):
        await stack.publish(part)
        consume_until_idle(stack, LEDGER_MAX_BATCH="20")
    published = await stack.billing_records()
    events = [checked(r) for r in published]
    ledger = await ledger_usage(stack)
    assert_deltas_add_up(events, ledger)
    assert any(e["data"]["revision"] > 1 for e in events)  # supersession happened
    assert any(e["data"]["delta"]["cost_micros"] < 0 for e in events)

    assert stack.cli("replay", "--to-offset", "0").returncode == 0
    consume_until_idle(stack)
    assert len(await stack.billing_records()) == len(published)
    assert await ledger_usage(stack) == ledger


async def _outbox(stack: Stack) -> tuple[int, int]:
    """(published, pending) revisions in the outbox."""
    conn = await stack.connect()
    try:
        row = await conn.fetchrow(
            "SELECT count(published_at) AS published, count(*) - count(published_at) AS pending"
            " FROM billing_outbox"
        )
    finally:
        await conn.close()
    return row["published"], row["pending"]


async def test_the_relay_killed_mid_way_publishes_every_revision_at_least_once_in_order(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(
        TrafficConfig(threads=60, turns_per_thread=4, seed=32, poison_rate=0, start=START)
    )
    half = len(records) // 2
    for part in (records[:half], records[half:]):
        await stack.publish(part)
        consume_until_idle(stack, LEDGER_RELAY="false")
    published, total = await _outbox(stack)
    assert (published, await stack.billing_records()) == (0, [])

    first = relay_process(stack.env(LEDGER_RELAY_BATCH="3"), tmp_path / "first.log")
    processes.append(first)

    async def some_published() -> bool:
        return (await _outbox(stack))[0] >= 30

    await wait_for(some_published, within=60, what="some revisions published", context=first.logs)
    first.kill()
    published, pending = await _outbox(stack)
    assert published > 0 and pending > 0, "killed too late to be mid-way"

    second = relay_process(stack.env(), tmp_path / "second.log")
    processes.append(second)

    async def all_published() -> bool:
        return (await _outbox(stack))[1] == 0

    await wait_for(all_published, within=60, what="every revision published", context=second.logs)
    code, _ = second.terminate()
    assert code == 0, second.logs()

    by_id: dict[str, bytes] = {}
    order: dict[tuple[int, int], list[int]] = defaultdict(list)  # (partition, usage) -> revisions
    for record in await stack.billing_records():
        event = checked(record)
        assert by_id.setdefault(event["id"], record.value) == record.value  # identical copies
        usage_id = int(event["id"].partition(":")[0])
        order[record.partition, usage_id].append(event["data"]["revision"])
    assert len(by_id) == total
    for revisions in order.values():
        firsts = list(dict.fromkeys(revisions))  # first appearances
        assert firsts == sorted(firsts), revisions
    assert_deltas_add_up([json.loads(v) for v in by_id.values()], await ledger_usage(stack))


def relay_process(env: dict[str, str], log: Path) -> ConsumerProcess:
    """`token-ledger relay` as a child process."""
    return ConsumerProcess(env, log, command="relay").start()


async def test_usage_in_every_format_equals_a_direct_aggregate(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(
        TrafficConfig(threads=30, turns_per_thread=3, seed=33, poison_rate=0, start=START)
    )
    await stack.publish(records)
    consume_until_idle(stack)
    conn = await stack.connect()
    try:
        kinds = ("cached_tokens", "reasoning_tokens")
        rows = await conn.fetch(
            "WITH r AS (SELECT u.*, "
            + ", ".join(
                f"(SELECT sum((b.value->>'{k}')::bigint) FROM jsonb_each(u.model_breakdown) AS b)"
                f" AS {k}"
                for k in kinds
            )
            + " FROM token_usage AS u)"
            " SELECT search_space_id::text AS space,"
            " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, "
            + ", ".join(f"sum({m})::bigint AS {m}" for m in (*MEASURES, *kinds))
            + ", count(*) AS usage_rows FROM r GROUP BY 1, 2 ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    # No breakdown in a group reports a token kind: the report says 0.
    expected = [{k: str(0 if v is None else v) for k, v in dict(r).items()} for r in rows]
    assert any(row["cached_tokens"] != "0" for row in expected)
    by = ("--by", "space", "--by", "day")

    as_csv = stack.cli("usage", *by, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert list(csv.DictReader(io.StringIO(as_csv.stdout))) == expected

    totals = {
        k: str(sum(int(row[k]) for row in expected)) for k in (*MEASURES, *kinds, "usage_rows")
    }
    as_json = stack.cli("usage", *by, "--format", "json")
    *groups, total = [
        {k: str(v) for k, v in json.loads(line).items()} for line in as_json.stdout.splitlines()
    ]
    assert groups == expected
    assert total == {"space": "None", "day": "None", **totals, "total": "True"}

    as_table = stack.cli("usage", *by)  # not a terminal: tab-separated, nothing cut
    header, *lines = as_table.stdout.splitlines()
    *rows_shown, total_shown = [
        dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines
    ]
    assert rows_shown == expected
    assert total_shown == {"space": "total", "day": "", **totals}

    # One tenant, one day: the filters give that group alone (and its total).
    space, day = expected[0]["space"], expected[0]["day"]
    only = stack.cli("usage", "--by", "day", "--space", space, "--since", day, "--format", "csv")
    assert only.returncode == 0, only.stderr
    nobody = stack.cli("usage", "--space", "999999999", "--format", "json")
    (nothing,) = [json.loads(line) for line in nobody.stdout.splitlines()]
    assert {k: nothing[k] for k in (*MEASURES, "usage_rows")} == dict.fromkeys(
        (*MEASURES, "usage_rows"), 0
    )  # the total of nothing is 0, not null
    mine = [row for row in expected if row["space"] == space]
    assert list(csv.DictReader(io.StringIO(only.stdout))) == [
        {k: v for k, v in row.items() if k != "space"} for row in mine if row["day"] >= day
    ]


async def test_published_revisions_are_pruned_after_the_retention(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(records_of(started(), appended(cost=777, seconds=5)))
    consume_until_idle(stack, LEDGER_RELAY="false")
    assert await _outbox(stack) == (0, 1)
    relay = relay_process(stack.env(LEDGER_OUTBOX_RETENTION="PT1S"), tmp_path / "relay.log")
    processes.append(relay)

    async def pruned() -> bool:
        return await _outbox(stack) == (0, 0)

    await wait_for(pruned, within=60, what="the published revision pruned", context=relay.logs)
    assert len(await stack.billing_records()) == 1
    assert len(await ledger_usage(stack)) == 1  # the usage row stays
    assert relay.terminate()[0] == 0
