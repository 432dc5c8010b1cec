"""Money at the edge, on real Kafka and PostgreSQL (docs/contract.md#numbers,
docs/contract.md#billing-attribution): numbers every path can read back, billing that no one
record stops, revisions billed to the right user and day, threads split over partitions, and
dead letters whose headers have null values."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from producer import jsonvalues
from producer.client import thread_key
from producer.events import AnyEvent, encode_event
from tests.factories import USER, appended, call, finalized, started
from tests.integration.harness import ConsumerProcess, Stack, log_messages, wait_for
from tests.integration.test_consumer_edges import metric_value

T0 = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)
BEFORE_MIDNIGHT = (datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC) - T0).total_seconds()
AFTER_MIDNIGHT = (datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC) - T0).total_seconds()
OTHER_USER = uuid.UUID(int=0xB)
PLACEHOLDER = b"4242424242"  # a number in an encoded event, replaced by raw JSON text


def records_of(*events: AnyEvent) -> list[tuple[bytes, bytes]]:
    return [(thread_key(event.thread_id), encode_event(event)) for event in events]


def with_number(event: AnyEvent, raw: bytes) -> tuple[bytes, bytes]:
    """The event's record with PLACEHOLDER replaced by `raw`, a number as a producer wrote it."""
    value = encode_event(event)
    assert PLACEHOLDER in value
    return thread_key(event.thread_id), value.replace(PLACEHOLDER, raw)


def legacy_with(field: str, *, thread_id: int, turn_id: str) -> AnyEvent:
    """A legacy append whose breakdown entry carries `field` = PLACEHOLDER (kept as sent)."""
    entry = {"prompt_tokens": 10, "total_tokens": 15, field: int(PLACEHOLDER)}
    return appended(
        cost=900, thread_id=thread_id, space=thread_id, turn_id=turn_id, breakdown={"m": entry}
    )


def cli_ok(stack: Stack, *args: str, **env: str) -> str:
    run = stack.cli(*args, **env)
    assert run.returncode == 0, (args, run.returncode, run.stderr[-3000:])
    return run.stdout


def every_report_runs(stack: Stack) -> None:
    """verify (0: the ledger matches), usage in every grouping and format, dlq list: none of
    them may fail on what the ledger accepted."""
    cli_ok(stack, "verify")
    for by in (["model"], ["user", "day"], ["space", "month"]):
        for output in ("table", "csv", "json"):
            cli_ok(stack, "usage", *(f"--by={d}" for d in by), f"--format={output}")
    cli_ok(stack, "dlq", "list")


async def two_tenants_not_billed_yet(kafka_bootstrap: str, ledger_url: str) -> Stack:
    """A legacy usage of tenant 1 (thread 1) and of tenant 2 (thread 2) in the ledger, their
    revisions pending in the outbox (applied with the relay off)."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(
        records_of(
            appended(thread_id=1, space=1, turn_id="1:a", cost=900),
            appended(thread_id=2, space=2, turn_id="2:a", cost=800),
        )
    )
    cli_ok(stack, "consume", "--until-idle", LEDGER_RELAY="false")
    return stack


async def says_it_holds_back(process: ConsumerProcess, held: str) -> None:
    """/readyz names the held revision, the pending gauge counts it (once the pass has ended)
    and token_ledger_billing_refused says one is held."""

    async def says_why() -> bool:
        status, body = await asyncio.to_thread(process.http, "/readyz")
        return status == 503 and f"billing revision {held} held back" in body

    async def counts_it() -> bool:
        return metric_value(process, "token_ledger_outbox_pending") == 1

    await wait_for(says_why, what="/readyz naming the held revision", context=process.logs)
    await wait_for(counts_it, what="the revision counted pending", context=process.logs)
    assert metric_value(process, "token_ledger_billing_refused") == 1


async def test_a_number_no_path_can_read_back_is_a_dead_letter_naming_its_field(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    """1e4400 would be stored by PostgreSQL as 4,401 digits, which Python does not read: the
    relay would fail on it for every tenant, and the consumer's next batch of that message."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    other_tenant = finalized(thread_id=2, space=2, turn_id="2:a", calls=[call(cost=300)])
    await stack.publish(
        [
            *records_of(started(thread_id=1, space=1, turn_id="1:a")),
            with_number(legacy_with("latency", thread_id=1, turn_id="1:a"), b"1e4400"),
            with_number(legacy_with("cached_tokens", thread_id=1, turn_id="1:b"), b"9e4299"),
            with_number(legacy_with("cached_tokens", thread_id=1, turn_id="1:c"), b"-1E5"),
            *records_of(other_tenant),
        ]
    )
    cli_ok(stack, "consume", "--until-idle")

    letters = await stack.dead_letters()
    details = sorted(dict(letter.headers)["ledger.error.detail"].decode() for letter in letters)
    reasons = {dict(letter.headers)["ledger.error.reason"] for letter in letters}
    assert reasons == {b"schema_invalid"}
    assert details == [
        f"token_usage.usage.m.{name}: number out of range (at most 1000 digits before and"
        " after the point)"
        for name in ("cached_tokens", "latency")
    ]
    billed = [json.loads(r.value) for r in await stack.billing_records()]
    assert sorted(e["subject"] for e in billed) == ["1", "2"]
    conn = await stack.connect()
    try:
        # Kept as the value it is; PostgreSQL writes the exponent out (docs/contract.md#numbers).
        stored = await conn.fetchval(
            "SELECT model_breakdown->'m'->>'cached_tokens' FROM token_usage WHERE thread_id = 1"
        )
    finally:
        await conn.close()
    assert stored == "-100000"
    every_report_runs(stack)


async def _plant_numbers_an_older_release_accepted(stack: Stack) -> None:
    """What a ledger written before numbers were bounded may hold: 1e4400 in a stored
    breakdown (and its pending revision), 1e4301 in content, two token kinds of 9e4299."""
    conn = await stack.connect()
    try:
        await conn.execute(
            "UPDATE token_usage SET model_breakdown = jsonb_build_object('m', jsonb_build_object("
            " 'latency', 1e4400::numeric, 'cached_tokens', 9e4299::numeric))"
        )
        await conn.execute(
            "UPDATE chat_messages SET content = jsonb_build_array(jsonb_build_object("
            " 'type', 'chart', 'value', 1e4301::numeric))"
        )
        await conn.execute(
            "UPDATE billing_outbox SET published_at = NULL,"
            " model_breakdown = (SELECT model_breakdown FROM token_usage LIMIT 1)"
        )
    finally:
        await conn.close()


async def test_a_ledger_holding_numbers_written_before_the_bound_keeps_running(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(
        records_of(
            started(thread_id=1, space=1, turn_id="1:a"),
            appended(thread_id=1, space=1, turn_id="1:a", cost=900, seconds=5),
            appended(thread_id=1, space=1, turn_id="1:b", cost=800, seconds=6),
        )
    )
    cli_ok(stack, "consume", "--until-idle", LEDGER_RELAY="false")
    await _plant_numbers_an_older_release_accepted(stack)

    # The server's finalize of that message: the batch reads the stored breakdown.
    await stack.publish(
        records_of(finalized(thread_id=1, space=1, turn_id="1:a", calls=[call(cost=300)]))
    )
    cli_ok(stack, "consume", "--until-idle")
    # Read as exactly as the relay wrote them: json.loads refuses integers of 4,401 digits.
    billed = [jsonvalues.loads(r.value) for r in await stack.billing_records()]
    assert sum(e["data"]["delta"]["cost_micros"] for e in billed) == 300 + 800
    big = [e for e in billed if "latency" in e["data"]["model_breakdown"].get("m", {})]
    assert big and all(e["data"]["model_breakdown"]["m"]["latency"] == 10**4400 for e in big)

    verify = stack.cli("verify")  # the planted numbers are not what the topic says
    assert verify.returncode == 1, verify.stderr[-3000:]
    for output in ("table", "csv", "json"):
        cli_ok(stack, "usage", "--by=model", "--by=day", f"--format={output}")
    usage = cli_ok(stack, "usage", "--by=space", "--format=json")
    # 1:b's planted breakdown is still stored (the finalize replaced 1:a's).
    first, total = map(jsonvalues.loads, usage.splitlines())  # one space, then the total
    assert first["cached_tokens"] == total["cached_tokens"] == 9 * 10**4299


async def test_a_revision_no_record_can_be_built_from_holds_back_only_its_message(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path, processes: list[ConsumerProcess]
) -> None:
    stack = await two_tenants_not_billed_yet(kafka_bootstrap, ledger_url)
    conn = await stack.connect()
    try:  # an instant no CloudEvent `time` can carry (written by hand, say)
        held = await conn.fetchval(
            "UPDATE billing_outbox SET occurred_at = '-infinity' WHERE thread_id = 1"
            " RETURNING usage_id || ':' || revision"
        )
    finally:
        await conn.close()

    run = stack.cli("consume", "--until-idle")
    assert run.returncode == 1
    assert f"billing revisions held back: {held}: cannot be built: ValueError" in run.stderr
    billed = [json.loads(r.value) for r in await stack.billing_records()]
    assert [e["subject"] for e in billed] == ["2"]

    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log").start()
    processes.append(consumer)

    await says_it_holds_back(consumer, held)
    assert "billing revision held back: it and its message's later revisions wait" in (
        log_messages(consumer.logs())
    )


async def test_a_supersession_that_moves_user_and_day_reverses_under_the_old_attribution(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    """A legacy append by no user at 23:59:59 for 900, superseded by the server's finalize by
    another user at 00:00:01 for 300: billing must not credit -600 to the new user's day."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    legacy = appended(cost=900, user=None, seconds=BEFORE_MIDNIGHT)
    await stack.publish(records_of(started(user=USER), legacy))
    cli_ok(stack, "consume", "--until-idle")
    final = finalized(calls=[call(cost=300)], user=OTHER_USER, seconds=AFTER_MIDNIGHT)
    await stack.publish(records_of(final))
    cli_ok(stack, "consume", "--until-idle")

    billed = [json.loads(r.value) for r in await stack.billing_records()]
    stream = [
        (
            e["data"]["revision"],
            e["data"]["user_id"],
            e["time"][:10],
            e["data"]["delta"]["cost_micros"],
            e["data"]["reverses"],
        )
        for e in billed
    ]
    assert stream == [
        (1, None, "2026-11-26", 900, None),
        (2, None, "2026-11-26", -900, 1),
        (3, str(OTHER_USER), "2026-11-27", 300, None),
    ]
    by_user_day: Counter[tuple[Any, ...]] = Counter()
    for event in billed:
        key = (event["subject"], event["data"]["user_id"] or "(none)", event["time"][:10])
        by_user_day[key] += event["data"]["delta"]["cost_micros"]
    rows = cli_ok(stack, "usage", "--by=space", "--by=user", "--by=day", "--format=json")
    ledger = {
        (row["space"], row["user"], row["day"]): row["cost_micros"]
        for row in map(json.loads, rows.splitlines())
        if not row.get("total")
    }
    assert {k: v for k, v in by_user_day.items() if v} == ledger
    assert ledger == {("7", str(OTHER_USER), "2026-11-27"): 300}


def assigned(member: ConsumerProcess) -> list[int] | None:
    """The partitions a member was last assigned, from its log."""
    found = None
    for line in member.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "partitions assigned":
            found = entry["partitions"]
    return found


async def test_two_members_count_a_thread_split_over_partitions_once(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path, processes: list[ConsumerProcess]
) -> None:
    """Each new thread's turn events on partition 0 and its legacy appends on partition 1 (a
    producer that partitions with another hash), read by two members at the same pace: both
    see threads that do not exist yet, and only one of them may count a message's usage new."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=2)
    await stack.create_topic()
    members = [
        ConsumerProcess(stack.env(LEDGER_MAX_BATCH="10"), tmp_path / f"member-{i}.log").start()
        for i in range(2)
    ]
    processes.extend(members)

    async def one_partition_each() -> bool:
        return sorted(map(str, (assigned(m) for m in members))) == ["[0]", "[1]"]

    await wait_for(one_partition_each, within=60, what="a partition for each member")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sends = []
        for thread in range(1, 501):
            turn = f"{thread}:a"
            for partition, event in (
                (0, started(thread_id=thread, space=1, turn_id=turn)),
                (1, appended(thread_id=thread, space=1, turn_id=turn, cost=900, seconds=5)),
                (0, finalized(thread_id=thread, space=1, turn_id=turn, calls=[call(cost=300)])),
                (1, appended(thread_id=thread, space=1, turn_id=None, role="user", seconds=6)),
            ):
                value, key = encode_event(event), thread_key(thread)
                sends.append(await producer.send(stack.topic, value, key, partition=partition))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    await wait_for(stack.caught_up, within=120, what="both partitions applied")

    def net_cost() -> float:
        total = 0.0
        for member in members:
            _, text = member.http("/metrics")
            for line in text.splitlines():
                name, _, value = line.rpartition(" ")
                if name.startswith("token_ledger_cost_micros_total{"):
                    total += float(value)
                elif name.startswith("token_ledger_cost_micros_reversed_total{"):
                    total -= float(value)
        return total

    conn = await stack.connect()
    try:
        ledger = await conn.fetchval("SELECT sum(cost_micros) FROM token_usage")
    finally:
        await conn.close()
    assert ledger == 500 * 300
    assert net_cost() == ledger


async def test_dead_letters_whose_headers_have_null_values_are_listed_and_replayed(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    headers = [("trace", None), ("tenant", b"7")]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(stack.topic, b"not json", b"1", headers=headers)
    finally:
        await producer.stop()
    cli_ok(stack, "consume", "--until-idle")
    (letter,) = await stack.dead_letters()
    assert list(letter.headers[:2]) == headers

    listed = cli_ok(stack, "dlq", "list")
    assert "invalid_json" in listed
    assert "would replay 1 record(s)" in cli_ok(stack, "dlq", "replay", "--dry-run")
    assert "replayed 1 record(s)" in cli_ok(stack, "dlq", "replay")
    cli_ok(stack, "consume", "--until-idle")
    letters = await stack.dead_letters()
    assert len(letters) == 2
    assert list(letters[1].headers[:2]) == headers  # the replayed copy kept them too
    cli_ok(stack, "verify")


async def test_a_stored_value_postgresql_cannot_print_stops_only_its_own_message(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    """What an older release accepted: 9,000 numbers of 131,072 digits in one breakdown, 2 KB
    stored and over 1 GB printed (PostgreSQL refuses: SQLSTATE 54000). Its revision is held
    back, a later event of its message is dead-lettered alone, everyone else is billed, and
    verify says where it stopped."""
    stack = await two_tenants_not_billed_yet(kafka_bootstrap, ledger_url)
    conn = await stack.connect()
    try:
        unprintable = (
            "jsonb_build_object('m', jsonb_build_object('x',"
            " (SELECT jsonb_agg(1e131071::numeric) FROM generate_series(1, 9000))))"
        )
        for table in ("token_usage", "billing_outbox"):
            await conn.execute(
                f"UPDATE {table} SET model_breakdown = {unprintable} WHERE thread_id = 1"
            )
        held = await conn.fetchval(
            "SELECT usage_id || ':' || revision FROM billing_outbox WHERE thread_id = 1"
        )
    finally:
        await conn.close()
    await stack.publish(
        records_of(
            finalized(thread_id=1, space=1, turn_id="1:a", calls=[call(cost=300)]),
            appended(thread_id=3, space=3, turn_id="3:a", cost=700),
        )
    )

    run = stack.cli("consume", "--until-idle")
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"{held}: cannot be read: ProgramLimitExceededError" in run.stderr
    billed = sorted(json.loads(r.value)["subject"] for r in await stack.billing_records())
    assert billed == ["2", "3"]
    (letter,) = await stack.dead_letters()
    assert dict(letter.headers)["ledger.error.reason"] == b"database_rejected"
    verify = stack.cli("verify")
    assert verify.returncode == 1, verify.stderr[-3000:]
    assert "cannot print" in verify.stdout


async def test_the_relay_alone_says_what_it_holds_back(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path, processes: list[ConsumerProcess]
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(records_of(appended(thread_id=1, space=1, turn_id="1:a", cost=900)))
    cli_ok(stack, "consume", "--until-idle", LEDGER_RELAY="false")
    conn = await stack.connect()
    try:  # an instant no CloudEvent `time` can carry
        held = await conn.fetchval(
            "UPDATE billing_outbox SET occurred_at = '-infinity'"
            " RETURNING usage_id || ':' || revision"
        )
    finally:
        await conn.close()
    relay = ConsumerProcess(stack.env(), tmp_path / "relay.log", command="relay").start()
    processes.append(relay)

    await says_it_holds_back(relay, held)
    assert "no partitions assigned" not in relay.http("/readyz")[1]
