"""What the consumer tells an operator without being asked: the ready gauge, lag that counts
records blocked on the database, a stall logged when it starts and when it ends, and the time
of the ledger's last commit after a restart (docs/operations.md#reading-lag-and-readiness)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from producer.client import ensure_topic, thread_key
from producer.events import AnyEvent, encode_event
from tests.factories import appended, started
from tests.integration.harness import ConsumerProcess, Stack, said, wait_for

BLOCKED = 60  # records published while the offsets table is locked


def records_of(events: list[AnyEvent]) -> list[tuple[bytes, bytes]]:
    return [(thread_key(event.thread_id), encode_event(event)) for event in events]


def turns(first_thread: int, count: int) -> list[tuple[bytes, bytes]]:
    """`count` records: a started turn and a legacy answer for count/2 threads."""
    events: list[AnyEvent] = []
    for thread in range(first_thread, first_thread + count // 2):
        events += [started(thread_id=thread), appended(thread_id=thread, seconds=1)]
    return records_of(events)


def sample(metrics: str, name: str) -> dict[str, float]:
    """label value (or "" without labels) -> value, of one metric in a /metrics exposition."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            labels, _, value = line.rpartition(" ")
            found[labels.partition('"')[2].rpartition('"')[0]] = float(value)
    return found


async def metrics_of(process: ConsumerProcess) -> str:
    """Its /metrics; empty while it is not listening yet."""
    status, body = await asyncio.to_thread(process.http, "/metrics")
    return body if status == 200 else ""


def log_lines(process: ConsumerProcess) -> list[dict[str, object]]:
    lines = []
    for line in process.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            lines.append(entry)
    return lines


async def test_gauges_lag_and_stalls_are_true_without_a_probe(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path, processes: list[ConsumerProcess]
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    await stack.publish(turns(1, 40))
    consumer = ConsumerProcess(
        stack.env(LEDGER_STALL_SECONDS="2"), tmp_path / "consumer.log"
    ).start()
    processes.append(consumer)
    await wait_for(stack.caught_up, within=60, what="the first records", context=consumer.logs)

    # Nobody has asked /readyz (and nothing below does): the consumer judges itself.
    async def ready_is(value: float) -> bool:
        return sample(await metrics_of(consumer), "token_ledger_ready") == {"": value}

    await wait_for(lambda: ready_is(1), within=30, what="ready, unprobed", context=consumer.logs)
    assert sample(await metrics_of(consumer), "token_ledger_last_commit_timestamp_seconds")[""] > 0

    conn = await stack.connect()
    try:
        # Writers of consumer_offsets wait (every batch moves its offsets first); readers do not.
        locker = conn.transaction()
        await locker.start()
        await conn.execute("LOCK TABLE consumer_offsets IN EXCLUSIVE MODE")
        await stack.publish(turns(1_000, BLOCKED))

        async def blocked_records_count_and_stall() -> bool:
            metrics = await metrics_of(consumer)
            lag = sum(sample(metrics, "token_ledger_consumer_lag_records").values())
            return lag == BLOCKED and sample(metrics, "token_ledger_ready") == {"": 0}

        await wait_for(
            blocked_records_count_and_stall,
            within=60,
            what="the blocked batch counted as lag, and not ready",
            context=consumer.logs,
        )
        assert not await stack.caught_up()  # really blocked: nothing of it committed
        stalls = [e for e in log_lines(consumer) if str(e["msg"]).startswith("stalled")]
        assert [(e["level"], e["records"]) for e in stalls] == [("warning", BLOCKED)]
        await locker.rollback()
    finally:
        await conn.close()

    await wait_for(stack.caught_up, within=60, what="the blocked records", context=consumer.logs)
    await wait_for(lambda: ready_is(1), within=30, what="ready again", context=consumer.logs)
    lines = log_lines(consumer)
    assert [e["level"] for e in lines if str(e["msg"]).startswith("stalled")] == ["warning"]
    over = [e for e in lines if e["msg"] == "stall over"]
    assert [e["level"] for e in over] == ["info"]
    assert consumer.terminate()[0] == 0

    # A consumer that has nothing to do still says when the ledger last moved.
    conn = await stack.connect()
    try:
        committed = await conn.fetchval(
            "SELECT extract(epoch FROM max(updated_at))::float8 FROM consumer_offsets"
        )
    finally:
        await conn.close()
    restarted = ConsumerProcess(stack.env(), tmp_path / "restarted.log").start()
    processes.append(restarted)

    async def last_commit_shown() -> bool:
        metrics = await metrics_of(restarted)
        shown = sample(metrics, "token_ledger_last_commit_timestamp_seconds")
        return shown.get("") == committed and sample(metrics, "token_ledger_ready") == {"": 1}

    await wait_for(
        last_commit_shown, within=60, what="the ledger's last commit", context=restarted.logs
    )
    assert restarted.terminate()[0] == 0


async def test_a_new_groups_first_batch_blocked_on_the_database_is_lag_and_a_stall(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path, processes: list[ConsumerProcess]
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.publish(turns(1, BLOCKED))  # a new group: nothing stored to count from
    conn = await stack.connect()
    try:
        locker = conn.transaction()
        await locker.start()
        await conn.execute("LOCK TABLE consumer_offsets IN EXCLUSIVE MODE")
        consumer = ConsumerProcess(
            stack.env(LEDGER_STALL_SECONDS="2"), tmp_path / "consumer.log"
        ).start()
        processes.append(consumer)

        async def blocked_records_count_and_stall() -> bool:
            metrics = await metrics_of(consumer)
            lag = sum(sample(metrics, "token_ledger_consumer_lag_records").values())
            return lag == BLOCKED and sample(metrics, "token_ledger_ready") == {"": 0}

        await wait_for(
            blocked_records_count_and_stall,
            within=60,
            what="the blocked first batch counted as lag, and not ready",
            context=consumer.logs,
        )
        assert not await stack.caught_up()
        await locker.rollback()
    finally:
        await conn.close()
    await wait_for(stack.caught_up, within=60, what="the first batch", context=consumer.logs)
    assert consumer.terminate()[0] == 0


async def test_a_session_timeout_the_broker_refuses_is_exit_2_naming_the_variable(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    # The broker's group.min.session.timeout.ms is 6 s by default.
    run = await asyncio.to_thread(
        stack.cli, "consume", LEDGER_SESSION_TIMEOUT="2", LEDGER_HEARTBEAT_INTERVAL="0.5"
    )
    assert run.returncode == 2, run.stderr
    assert "LEDGER_SESSION_TIMEOUT" in said(run.stderr.strip().splitlines()[-1])


async def test_a_missing_billing_topic_is_named_once_when_topics_may_not_be_created(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path, processes: list[ConsumerProcess]
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    await ensure_topic(  # sized for the source's largest record, as `consume` would
        stack.bootstrap, stack.dlq_topic, partitions=1, config={"max.message.bytes": "2000000"}
    )
    consumer = ConsumerProcess(
        stack.env(LEDGER_CREATE_TOPICS="false"), tmp_path / "consumer.log"
    ).start()
    processes.append(consumer)

    async def relay_says_which_topic() -> bool:
        return any(
            stack.billing_topic in str(e["msg"]) and "LEDGER_BILLING_TOPIC" in str(e["msg"])
            for e in log_lines(consumer)
        )

    await wait_for(relay_says_which_topic, within=60, what="the missing billing topic named")
    await stack.publish(turns(1, 10))  # the ledger goes on without its billing topic
    await wait_for(stack.caught_up, within=60, what="the ledger", context=consumer.logs)
    assert consumer.process is not None and consumer.process.poll() is None
    named = [e for e in log_lines(consumer) if stack.billing_topic in str(e["msg"])]
    assert len(named) == 1, named
    assert consumer.terminate()[0] == 0
