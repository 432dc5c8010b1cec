"""Edges of the consumer's life (docs/operations.md#stopping): a SIGTERM at any moment of start-up, a stored
offset outside a recreated topic's log, and a broker outage that stays a handful of log lines."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from devstack.kafka import KafkaBroker
from devstack.processes import free_port
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    expected_summary,
    ledger_summary,
    said,
    wait_for,
)


def metric_value(consumer: ConsumerProcess, sample: str) -> float | None:
    """One sample of the consumer's /metrics, e.g. 'token_ledger_partition_halted{partition="0"}'."""
    _, text = consumer.http("/metrics")
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM yet (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def log_entries(consumer: ConsumerProcess) -> list[dict[str, object]]:
    entries = []
    for line in consumer.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"msg": line, "level": "raw"}  # a line the logger did not write counts too
        entries.append(entry if isinstance(entry, dict) else {"msg": line, "level": "raw"})
    return entries


# -- SIGTERM from the first instruction on ---------------------------------------------------


async def test_sigterm_at_any_moment_of_start_up_exits_0_within_10s(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path
) -> None:
    """From the first instruction of ours on (the interpreter's own start-up is not ours to
    handle): while Python imports the CLI, while the service opens its resources, while it
    joins the group, a stop is a clean exit, never death by signal 15 (which an orchestrator
    reports as a crash) and never a hang."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    rng = random.Random(10)
    delays = [0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
    delays += [rng.uniform(0, 0.6) for _ in range(11)]  # the import phase, most densely

    def stopped_after(index: int, delay: float) -> tuple[float, int, float, str]:
        consumer = ConsumerProcess(stack.env(), tmp_path / f"c{index}.log").start()
        assert consumer.process is not None
        try:
            deadline = time.monotonic() + 30
            while not catches_sigterm(consumer.process.pid) and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delay)  # the moment of the signal is the test's input
            code, seconds = consumer.terminate()
            return delay, code, seconds, consumer.logs()
        finally:
            consumer.stop_quietly()

    results: list[tuple[float, int, float, str]] = []
    for first in range(0, len(delays), 4):  # four at a time: 2 cores
        results += await asyncio.gather(
            *(
                asyncio.to_thread(stopped_after, index, delay)
                for index, delay in enumerate(delays[first : first + 4], start=first)
            )
        )
    for delay, code, seconds, logs in results:
        assert code == 0, f"SIGTERM after {delay:.2f}s: exit {code}\n{logs[-2000:]}"
        assert seconds < 10, f"SIGTERM after {delay:.2f}s: {seconds:.1f}s to exit"
        assert "Traceback" not in logs, logs


async def test_sigterm_once_consuming_exits_0_within_10s(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    for moment in ("consuming", "partitions assigned"):
        consumer = ConsumerProcess(stack.env(), tmp_path / f"{moment}.log").start()
        processes.append(consumer)

        async def reached(consumer: ConsumerProcess = consumer, moment: str = moment) -> bool:
            return f'"{moment}"' in consumer.logs()

        await wait_for(reached, within=60, what=moment, context=consumer.logs)
        code, seconds = consumer.terminate()
        assert (code, seconds < 10) == (0, True), consumer.logs()


# -- a stored offset outside the log ---------------------------------------------------------


async def _recreate_smaller(stack: Stack, seed: int) -> None:
    """Delete the topic and create it again with fewer records than the ledger has applied."""
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([stack.topic])

        async def gone() -> bool:
            return stack.topic not in await admin.list_topics()

        await wait_for(gone, within=30, what="the topic deleted")
    finally:
        await admin.close()
    records, _ = plan_traffic(
        TrafficConfig(threads=3, turns_per_thread=1, seed=seed, poison_rate=0, start=START)
    )
    await stack.publish(records)


async def test_until_idle_says_it_caught_up_and_not_that_a_stop_was_asked(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, _ = plan_traffic(
        TrafficConfig(threads=3, turns_per_thread=2, seed=23, poison_rate=0, start=START)
    )
    await stack.publish(records)
    run = stack.cli("consume", "--until-idle", LEDGER_LOG_FORMAT="json", LEDGER_LOG_LEVEL="INFO")
    assert run.returncode == 0, run.stderr
    said = [json.loads(line)["msg"] for line in run.stderr.splitlines()]
    assert any(msg.startswith("caught up") for msg in said), said
    assert not any("stop requested" in msg for msg in said), said


async def test_a_stored_offset_beyond_a_recreated_topic_stops_the_partition_with_fail(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, expect = plan_traffic(
        TrafficConfig(threads=20, turns_per_thread=3, seed=21, poison_rate=0, start=START)
    )
    await stack.publish(records)
    assert stack.cli("consume", "--until-idle").returncode == 0
    applied = await stack.stored_offsets()
    await _recreate_smaller(stack, seed=22)
    assert (await stack.end_offsets())[0] < applied[0]

    consumer = ConsumerProcess(stack.env(LEDGER_OFFSET_RESET="fail"), tmp_path / "fail.log").start()
    processes.append(consumer)
    halted = 'token_ledger_partition_halted{partition="0"}'

    async def stopped() -> bool:
        return await asyncio.to_thread(metric_value, consumer, halted) == 1

    await wait_for(stopped, within=60, what="partition 0 stopped", context=consumer.logs)
    status, body = consumer.http("/readyz")
    assert status == 503 and "offset out of range" in body, body
    resets = metric_value(consumer, 'token_ledger_offset_resets_total{partition="0"}')
    assert resets is not None and resets >= 1
    errors = [e for e in log_entries(consumer) if e.get("level") in ("error", "raw")]
    assert [e["msg"] for e in errors] == ["partition stopped"], errors
    assert consumer.terminate()[0] == 0
    # Nothing was skipped: the ledger is what it was, its offset where it was.
    assert await stack.stored_offsets() == applied
    assert await ledger_summary(stack) == expected_summary(expect)

    # `--until-idle` cannot finish that partition: a failure, said in one line.
    run = stack.cli("consume", "--until-idle", LEDGER_OFFSET_RESET="fail")
    assert run.returncode == 1, run.stderr
    *logged, last = run.stderr.strip().splitlines()
    assert said(last).startswith(
        "token-ledger: partitions stopped: partition 0: offset out of range"
    )
    assert [json.loads(line)["msg"] for line in logged if '"error"' in line] == [
        "partition stopped"
    ], run.stderr


async def test_a_stored_offset_beyond_a_recreated_topic_resumes_from_its_start_with_earliest(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, _ = plan_traffic(
        TrafficConfig(threads=20, turns_per_thread=3, seed=23, poison_rate=0, start=START)
    )
    await stack.publish(records)
    assert stack.cli("consume", "--until-idle").returncode == 0
    before = await ledger_summary(stack)
    await _recreate_smaller(stack, seed=24)

    run = stack.cli("consume", "--until-idle", LEDGER_OFFSET_RESET="earliest")
    assert run.returncode == 0, run.stderr
    assert "offset out of range: resuming from the log start" in run.stderr
    assert await stack.stored_offsets() == await stack.end_offsets()
    after = await ledger_summary(stack)
    assert after["threads"] == before["threads"] + 3  # the new topic's records were applied


# -- a broker outage is a handful of lines ---------------------------------------------------


@pytest.fixture
def own_broker() -> Iterator[KafkaBroker]:
    """A broker of this test's own, so that it can be stopped and started again."""
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-kafka-outage-"))
    broker = KafkaBroker(workdir, port=free_port(), controller_port=free_port())
    broker.start()
    yield broker
    broker.stop(grace_seconds=5.0)
    shutil.rmtree(workdir, ignore_errors=True)


async def test_a_30_second_broker_outage_is_fewer_than_10_log_lines(
    own_broker: KafkaBroker, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(own_broker.bootstrap, ledger_url)
    records, expect = plan_traffic(
        TrafficConfig(threads=30, turns_per_thread=3, seed=25, poison_rate=0, start=START)
    )
    half = len(records) // 2
    await stack.publish(records[:half])
    consumer = ConsumerProcess(stack.env(), tmp_path / "c.log").start()
    processes.append(consumer)
    await wait_for(stack.caught_up, within=60, what="first half applied", context=consumer.logs)

    async def ready(status: int) -> bool:
        return await consumer.status("/readyz") == status

    await wait_for(lambda: ready(200), within=30, what="ready")
    before = len(log_entries(consumer))

    await asyncio.to_thread(own_broker.stop, 5.0)
    outage_started = time.monotonic()
    await wait_for(lambda: ready(503), within=30, what="not ready while the broker is away")
    assert "Kafka unreachable" in consumer.http("/readyz")[1]
    await asyncio.sleep(max(0.0, 30 - (time.monotonic() - outage_started)))  # the outage
    await asyncio.to_thread(own_broker.start)
    await stack.publish(records[half:])
    await wait_for(stack.caught_up, within=90, what="the rest applied", context=consumer.logs)
    await wait_for(lambda: ready(200), within=30, what="ready again", context=consumer.logs)
    assert await ledger_summary(stack) == expected_summary(expect)

    during = log_entries(consumer)[before:]
    assert len(during) < 10, during
    messages = [entry["msg"] for entry in during]
    assert messages.count("Kafka unreachable") == 1, during
    assert messages.count("Kafka reachable again") == 1, during
