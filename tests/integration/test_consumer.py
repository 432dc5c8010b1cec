"""The consumer as a real process: end to end, crashes, rebalances, poison, shutdown."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from consumer.simulate.config import QUERIES, TrafficConfig
from consumer.simulate.expectation import SHAPES, Expectation
from consumer.simulate.traffic import plan_traffic
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    expected_summary,
    kept_unknown_fields,
    ledger_summary,
    wait_for,
)


@pytest.fixture
def stack(kafka_bootstrap: str, ledger_url: str) -> Stack:
    return Stack.fresh(kafka_bootstrap, ledger_url)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        process.stop_quietly()


def _consumer(
    stack: Stack, processes: list[ConsumerProcess], tmp_path: Path, *args: str, **env: str
) -> ConsumerProcess:
    process = ConsumerProcess(stack.env(**env), tmp_path / f"consumer-{len(processes)}.log", *args)
    processes.append(process)
    return process.start()


def _every_shape(expect: Expectation, *but: str) -> Expectation:
    """The plan carries every shape the simulator draws (SHAPES), so this test meets them."""
    assert [name for name in SHAPES if not expect.shapes[name] and name not in but] == []
    assert "(unattributed)" in expect.per_model
    return expect


async def test_end_to_end_ledger_equals_the_simulators_expectation(
    stack: Stack, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    records, expect = plan_traffic(
        TrafficConfig(
            threads=60,
            turns_per_thread=4,
            seed=21,
            duplicate_rate=0.3,
            shuffle_rate=0.5,
            poison_rate=0.02,
            start=START,
        )
    )
    _every_shape(expect)
    await stack.publish(records)
    consumer = _consumer(stack, processes, tmp_path, "--until-idle", LEDGER_MAX_BATCH="100")
    assert consumer.wait() == 0, consumer.logs()
    assert await ledger_summary(stack) == expected_summary(expect)
    assert await kept_unknown_fields(stack) == expect.kept_unknown_fields
    assert len(_first_of_each_source(await stack.dead_letters())) == expect.dead_letters
    assert await stack.caught_up()
    # Structured logs: every line is a JSON object; no password, message body or user query.
    lines = [json.loads(line) for line in consumer.logs().splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    text = consumer.logs()
    password = stack.database_url.split(":")[2].split("@")[0]
    assert f":{password}@" not in text
    for query in QUERIES:
        assert query not in text


async def test_kill_9_mid_stream_and_restart_loses_and_duplicates_nothing(
    stack: Stack, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    records, expect = plan_traffic(
        TrafficConfig(threads=150, turns_per_thread=5, seed=4, duplicate_rate=0.2, start=START)
    )
    _every_shape(expect)
    await stack.publish_with_transactions(records, _aborted_traffic(seed=5))
    total = len(records)
    for round_ in range(3):
        consumer = _consumer(stack, processes, tmp_path, LEDGER_MAX_BATCH="25")
        floor = (round_ + 1) * total // 5

        async def progressed(floor: int = floor) -> bool:
            return sum((await stack.stored_offsets()).values()) >= floor

        await wait_for(
            progressed, within=120, what=f"{floor} records applied", context=consumer.logs
        )
        consumer.kill()
        assert not await stack.caught_up(), "killed after the stream ended: not mid-stream"
    final = _consumer(stack, processes, tmp_path, "--until-idle")
    assert final.wait() == 0, final.logs()
    assert await ledger_summary(stack) == expected_summary(expect)
    assert await kept_unknown_fields(stack) == expect.kept_unknown_fields
    assert len(_first_of_each_source(await stack.dead_letters())) == expect.dead_letters


async def test_rebalance_between_two_consumers_mid_stream(
    stack: Stack, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    records, expect = plan_traffic(
        TrafficConfig(threads=150, turns_per_thread=5, seed=8, duplicate_rate=0.2, start=START)
    )
    half = len(records) // 2
    ghosts = _aborted_traffic(seed=9)
    await stack.publish_with_transactions(records[:half], ghosts[: len(ghosts) // 2])
    first = _consumer(stack, processes, tmp_path, LEDGER_MAX_BATCH="5")

    async def applied(count: int) -> bool:
        return sum((await stack.stored_offsets()).values()) >= count

    await wait_for(
        lambda: applied(half // 4), within=120, what="first consumer busy", context=first.logs
    )
    second = _consumer(stack, processes, tmp_path, LEDGER_MAX_BATCH="5")
    await wait_for(lambda: _ready(second), within=60, what="second consumer assigned")
    # keeps both busy across the next rebalance
    await stack.publish_with_transactions(records[half:], ghosts[len(ghosts) // 2 :])
    await wait_for(lambda: applied(half + 10), within=120, what="second half flowing")
    code, _ = first.terminate()  # a second rebalance: everything moves to the survivor
    assert code == 0, first.logs()
    await wait_for(
        stack.caught_up, within=180, what="the survivor to catch up", context=second.logs
    )
    second.terminate()
    assert await ledger_summary(stack) == expected_summary(expect)
    assert len(_first_of_each_source(await stack.dead_letters())) == expect.dead_letters
    assert '"partitions revoked"' in first.logs()
    assert second.logs().count('"partitions assigned"') >= 2


def _aborted_traffic(seed: int) -> list[tuple[bytes, bytes]]:
    """Turns with usage, and poison, that a chat service published in transactions it then
    aborted: none of it may change the ledger."""
    records, expect = plan_traffic(
        TrafficConfig(threads=30, turns_per_thread=3, seed=seed, poison_rate=0.05, start=START)
    )
    assert expect.usage_rows > 0 and expect.dead_letters > 0
    return records


def _first_of_each_source(letters: list[Any]) -> list[Any]:
    """Dead letters are at-least-once: keep the first letter of each source record."""
    seen, first = set(), []
    for letter in letters:
        headers = dict(letter.headers)
        source = (headers["ledger.source.partition"], headers["ledger.source.offset"])
        if source not in seen:
            seen.add(source)
            first.append(letter)
    return first


async def _ready(process: ConsumerProcess) -> bool:
    return await process.status("/readyz") == 200


async def test_poison_goes_to_the_dlq_with_headers_and_does_not_stall(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, expect = plan_traffic(
        TrafficConfig(
            threads=3, turns_per_thread=2, seed=2, poison_rate=0, duplicate_rate=0, start=START
        )
    )
    huge = b'{"type":"turn.started","pad":"' + b"x" * 5000 + b'"}'
    poison = [
        (b"1", b"{not json"),
        (b"1", huge),
        (b"1", b'{"type":"turn.exploded","schema_version":1}'),
    ]
    await stack.publish(records[:3] + poison + records[3:])
    consumer = _consumer(stack, processes, tmp_path, "--until-idle", LEDGER_MAX_EVENT_BYTES="4096")
    assert consumer.wait() == 0, consumer.logs()

    letters = _first_of_each_source(await stack.dead_letters())
    assert [letter.value for letter in letters] == [value for _, value in poison]
    for index, letter in enumerate(letters):
        headers = {k: v.decode() for k, v in letter.headers}
        assert letter.key == b"1"
        assert headers["ledger.source.topic"] == stack.topic
        assert headers["ledger.source.partition"] == "0"
        assert headers["ledger.source.offset"] == str(3 + index)
        assert datetime.fromisoformat(headers["ledger.failed_at"]).tzinfo is not None
        assert 0 < len(headers["ledger.error.detail"].encode()) <= 1024
    assert [dict(letter.headers)["ledger.error.reason"] for letter in letters] == [
        b"invalid_json",
        b"too_large",
        b"unknown_type",
    ]
    assert (await stack.stored_offsets())[0] == len(records) + len(poison)
    # every good record, before and after the poison, was applied
    assert await ledger_summary(stack) == expected_summary(expect)
    # One line per reason and batch, naming the positions.
    lines = [json.loads(line) for line in consumer.logs().splitlines() if '"dead-lettered"' in line]
    assert sorted((line["reason"], line["records"], *line["positions"]) for line in lines) == [
        ("invalid_json", 1, "0:3"),
        ("too_large", 1, "0:4"),
        ("unknown_type", 1, "0:5"),
    ]


async def test_database_rejection_is_isolated_and_dead_lettered(
    stack: Stack, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    conn = await stack.connect()
    try:  # stands in for any data the database refuses (SQLSTATE class 23)
        await conn.execute(
            "ALTER TABLE chat_messages ADD CONSTRAINT test_refuses_marker"
            " CHECK (content::text NOT LIKE '%refused-by-db%')"
        )
    finally:
        await conn.close()
    records, _ = plan_traffic(
        TrafficConfig(
            threads=20, turns_per_thread=3, seed=6, poison_rate=0, duplicate_rate=0, start=START
        )
    )
    bad = json.loads(records[5][1])
    bad_key = records[5][0]
    marked = [(k, v) for k, v in records if k != bad_key]
    refused = {
        **bad,
        "event_id": "6f9619ff-8b86-4d01-b42d-00cf4fc964ff",
        "type": "turn.started",
        "schema_version": 1,
        "turn_id": "x:1",
        "user_query": "refused-by-db",
        "mentioned_documents": [],
    }
    for field in ("content", "usage", "role", "token_usage"):
        refused.pop(field, None)
    await stack.publish([*marked[:50], (bad_key, json.dumps(refused).encode()), *marked[50:]])
    consumer = _consumer(stack, processes, tmp_path, "--until-idle")
    assert consumer.wait() == 0, consumer.logs()
    letters = await stack.dead_letters()
    # Dead letters are at-least-once (written before the commit that moves the offset past
    # them): a retried transaction may repeat one, so look at the distinct source records.
    rejected = {
        (h["ledger.error.reason"], h["ledger.source.partition"], h["ledger.source.offset"])
        for h in (dict(letter.headers) for letter in letters)
    }
    assert len(rejected) == 1, consumer.logs()
    assert next(iter(rejected))[0] == b"database_rejected"
    assert "23514" in dict(letters[0].headers)["ledger.error.detail"].decode()
    assert await stack.caught_up()


async def test_sigterm_commits_the_batch_in_flight_and_exits_0_within_10s(
    stack: Stack, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    records, _ = plan_traffic(TrafficConfig(threads=200, turns_per_thread=5, seed=9, start=START))
    await stack.publish(records)
    consumer = _consumer(stack, processes, tmp_path, LEDGER_MAX_BATCH="10")

    async def some_applied() -> bool:
        return sum((await stack.stored_offsets()).values()) > 100

    await wait_for(some_applied, within=60, what="consumption to start", context=consumer.logs)
    code, seconds = consumer.terminate()
    assert code == 0, consumer.logs()
    assert seconds < 10
    assert '"stopped"' in consumer.logs()
    stored = await stack.stored_offsets()
    assert not await stack.caught_up()
    # What it committed to PostgreSQL is what it mirrored to Kafka: nothing half-done.
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        mirrored = await admin.list_consumer_group_offsets(stack.group_id)
    finally:
        await admin.close()
    assert {tp.partition: meta.offset for tp, meta in mirrored.items()} == stored


def test_bad_configuration_exits_2_with_one_line(tmp_path: Path, stack: Stack) -> None:
    process = ConsumerProcess(
        stack.env(LEDGER_KAFKA_SECURITY_PROTOCOL="SASL_SSL"), tmp_path / "bad.log"
    ).start()
    assert process.wait(timeout=30) == 2
    lines = process.logs().strip().splitlines()
    assert len(lines) == 1
    assert "LEDGER_KAFKA_SASL_MECHANISM" in lines[0]


async def test_operator_commands_dlq_usage_and_replay(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, expect = plan_traffic(
        TrafficConfig(
            threads=8,
            turns_per_thread=2,
            seed=9,
            poison_rate=0,
            legacy_rate=0.5,
            retry_rate=0.1,
            second_finalize_rate=0.2,
            start=START,
        )
    )
    _every_shape(expect, "poison")
    poison = [(b"1", b"{not json"), (b"1", b'{"type":"turn.exploded","schema_version":1}')]
    await stack.publish(records + poison)
    assert _consumer(stack, processes, tmp_path, "--until-idle").wait() == 0

    listed = stack.cli("dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert "2 dead letter(s)" in listed.stderr
    assert "invalid_json" in listed.stdout and "unknown_type" in listed.stdout
    assert "1 dead letter(s)" in stack.cli("dlq", "list", "--reason", "invalid_json").stderr

    end = (await stack.end_offsets())[0]
    assert "would replay 2 record(s)" in stack.cli("dlq", "replay", "--dry-run").stdout
    assert (await stack.end_offsets())[0] == end
    replayed = stack.cli("dlq", "replay", "--reason", "unknown_type")
    assert "replayed 1 record(s)" in replayed.stdout, replayed.stderr
    assert (await stack.end_offsets())[0] == end + 1
    assert _consumer(stack, processes, tmp_path, "--until-idle").wait() == 0
    again = [dict(letter.headers) for letter in await stack.dead_letters()]
    assert (b"unknown_type", str(end).encode()) in {
        (h["ledger.error.reason"], h["ledger.source.offset"]) for h in again
    }  # still bad: back in the dead-letter topic, from its new position

    report = stack.cli("usage", "--by", "model", "--json")
    assert report.returncode == 0, report.stderr
    by_model = {row.pop("model"): row for row in map(json.loads, report.stdout.splitlines())}
    for model, sums in expect.per_model.items():
        assert {k: by_model[model][k] for k in sums} == sums, model
    table = stack.cli("usage", "--by", "space", "--by", "day").stdout  # a pipe: tab-separated
    assert table.startswith("space\tday\tprompt_tokens\t")
    assert stack.cli("usage", "--by", "planet").returncode == 2

    before = await ledger_summary(stack)
    planned = stack.cli("replay", "--to-offset", "0", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert f"partition 0: {end + 1} -> 0 ({end + 1} records applied again)" in planned.stdout
    assert (await stack.stored_offsets())[0] == end + 1  # a dry run changes nothing
    unknown_group = stack.cli("replay", "--to-offset", "0", LEDGER_GROUP_ID="no-such-group")
    assert unknown_group.returncode == 2
    assert "'no-such-group' has no stored offsets" in unknown_group.stderr
    rewound = stack.cli("replay", "--to-offset", "0")
    assert f"partition 0: {end + 1} -> 0" in rewound.stdout, rewound.stderr
    assert (await stack.stored_offsets())[0] == 0
    assert _consumer(stack, processes, tmp_path, "--until-idle").wait() == 0
    assert await ledger_summary(stack) == before == expected_summary(expect)
    assert await kept_unknown_fields(stack) == expect.kept_unknown_fields
    assert stack.cli("replay").returncode == 2  # neither --from-time nor --to-offset
