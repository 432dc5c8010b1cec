"""Chat services that publish in Kafka transactions: the ledger reads committed records only.

An aborted transaction is never billed nor dead-lettered; a transaction still open holds its
records (and every record after its first one) back without looking like lag, a stall or an
unfinished `--until-idle`, and /readyz names it only once it has been open for the stall bound.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from consumer.simulate.config import TrafficConfig
from consumer.simulate.expectation import Expectation
from consumer.simulate.traffic import plan_traffic
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    expected_summary,
    ledger_summary,
    wait_for,
)

Records = list[tuple[bytes, bytes]]
# Long enough that the broker never aborts a transaction this module leaves open on purpose
# while a test still runs (2 busy cores); the broker's transaction.max.timeout.ms is 15 min.
OPEN_FOR_MS = 300_000


def _traffic(seed: int, threads: int = 8) -> tuple[Records, Expectation]:
    return plan_traffic(
        TrafficConfig(
            threads=threads,
            turns_per_thread=2,
            seed=seed,
            poison_rate=0,
            duplicate_rate=0.2,
            start=START,
        )
    )


async def _send(
    producer: AIOKafkaProducer, topic: str, records: Records, partition: int | None = None
) -> None:
    """Send (inside the producer's transaction, if one is open) and wait for every ack."""
    for key, value in records:
        await producer.send_and_wait(topic, value, key=key, partition=partition)


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


def _combined(*expects: Expectation) -> dict[str, Any]:
    """The summary of several plans' ledgers together (their threads are distinct)."""
    total: dict[str, Any] = {"threads": 0, "messages": 0, "usage_rows": 0, "per_model": {}}
    for expect in expects:
        summary = expected_summary(expect)
        for name in ("threads", "messages", "usage_rows"):
            total[name] += summary[name]
        for model, sums in summary["per_model"].items():
            into = total["per_model"].setdefault(model, dict.fromkeys(sums, 0))
            for name, value in sums.items():
                into[name] += value
    return total


def _gauges(metrics: str, name: str) -> dict[str, float]:
    """partition -> value of a per-partition gauge in a /metrics exposition."""
    prefix = f'{name}{{partition="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(prefix)
    }


async def test_aborted_transactions_are_neither_billed_nor_dead_lettered(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    committed, expect = _traffic(seed=61)
    aborted, aborted_expect = _traffic(seed=62)
    assert aborted_expect.usage_rows > 0  # finalize events with usage: billed if applied
    aborted_poison: Records = [(b"7", b"{not json"), (b"7", b'{"type":"turn.exploded"}')]
    committed_poison: Records = [(b"8", b'{"type":"turn.exploded","schema_version":1}')]
    half = len(committed) // 2
    async with (
        stack.transactional_producer("chat-a") as chat_a,
        stack.transactional_producer("chat-b") as chat_b,
    ):
        # Both open at once, their records interleaved on every partition.
        await chat_a.begin_transaction()
        await chat_b.begin_transaction()
        await _send(chat_a, stack.topic, aborted[: len(aborted) // 2] + aborted_poison)
        await _send(chat_b, stack.topic, committed[:half] + committed_poison)
        await _send(chat_a, stack.topic, aborted[len(aborted) // 2 :])
        await _send(chat_b, stack.topic, committed[half:])
        await chat_a.abort_transaction()
        await chat_b.commit_transaction()
        # Partition 2 ends on an abort marker, the others on commit markers: caught up all
        # the same, though the stored offsets (last applied record + 1) point at markers.
        await chat_a.begin_transaction()
        await _send(chat_a, stack.topic, aborted[:3], partition=2)
        await chat_a.abort_transaction()

    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log", "--until-idle").start()
    processes.append(consumer)
    assert consumer.wait() == 0, consumer.logs()
    assert await ledger_summary(stack) == expected_summary(expect)
    letters = _first_of_each_source(await stack.dead_letters())
    assert [letter.value for letter in letters] == [value for _, value in committed_poison]
    assert await stack.caught_up()
    ends, stored = await stack.end_offsets(), await stack.stored_offsets()
    assert all(stored.get(p, 0) < ends[p] for p in ends)  # markers (and aborted records) at the end

    verified = stack.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ledger matches the topic" in verified.stdout


async def test_open_transactions_hold_back_only_their_records_and_readiness_waits_the_bound(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    now, now_expect = _traffic(seed=71)
    later, later_expect = _traffic(seed=72)
    ghosts, _ = _traffic(seed=73, threads=2)
    # `now` is readable at once: committed in a transaction (partitions 0 and 2) or plain (1);
    # an aborted transaction follows on partition 2.
    # `later` waits: two transactions open at once, on partitions 0 and 1 and both on 2, and
    # plain records written after their first records (on 0 and 2), held behind them.
    pieces = [later[i::6] for i in range(6)]
    async with (
        stack.transactional_producer("committed") as committed,
        stack.transactional_producer("open-0", transaction_timeout_ms=OPEN_FOR_MS) as open_0,
        stack.transactional_producer("open-1", transaction_timeout_ms=OPEN_FOR_MS) as open_1,
        AIOKafkaProducer(bootstrap_servers=stack.bootstrap, enable_idempotence=True) as plain,
    ):
        await committed.begin_transaction()
        await _send(committed, stack.topic, now[0::3], partition=0)
        await _send(committed, stack.topic, now[2::3], partition=2)
        await committed.commit_transaction()
        await _send(plain, stack.topic, now[1::3], partition=1)
        await committed.begin_transaction()
        await _send(committed, stack.topic, ghosts, partition=2)
        await committed.abort_transaction()

        await open_0.begin_transaction()
        await open_1.begin_transaction()
        await _send(open_0, stack.topic, pieces[0], partition=0)
        await _send(open_1, stack.topic, pieces[1], partition=1)
        await _send(open_0, stack.topic, pieces[2], partition=2)
        await _send(open_1, stack.topic, pieces[3], partition=2)
        await _send(plain, stack.topic, pieces[4], partition=0)
        await _send(plain, stack.topic, pieces[5], partition=2)

        idle = ConsumerProcess(stack.env(), tmp_path / "idle.log", "--until-idle").start()
        processes.append(idle)
        assert idle.wait(timeout=90) == 0, idle.logs()  # not waiting for the open ones
        assert await ledger_summary(stack) == expected_summary(now_expect)

        # Open, but not for the stall bound yet: ready, no lag; the held records are counted.
        patient = ConsumerProcess(
            stack.env(LEDGER_STALL_SECONDS="600"), tmp_path / "patient.log"
        ).start()
        processes.append(patient)
        await wait_for(
            lambda: _metrics_show(patient, held_on={"0", "1", "2"}),
            within=60,
            what="held records counted per partition",
            context=patient.logs,
        )
        assert patient.http("/readyz") == (200, "ready\n")
        assert patient.terminate()[0] == 0

        # Past the bound: not ready, for a reason of its own (not "stalled").
        strict = ConsumerProcess(stack.env(LEDGER_STALL_SECONDS="2"), tmp_path / "strict.log")
        processes.append(strict.start())

        async def names_the_transaction() -> bool:
            status, body = await _readyz(strict)
            return status == 503 and "records wait on partition 0, 1, 2 behind" in body

        await wait_for(
            names_the_transaction, within=60, what="/readyz past the bound", context=strict.logs
        )
        _, body = strict.http("/readyz")
        assert body.startswith("open transaction: "), body
        assert "stalled" not in body

        await open_0.commit_transaction()
        await open_1.commit_transaction()
        await wait_for(stack.caught_up, within=60, what="the held records", context=strict.logs)
        await wait_for(lambda: _ready(strict), within=30, what="ready again", context=strict.logs)
        assert _gauges(strict.http("/metrics")[1], "token_ledger_uncommitted_records") == {
            "0": 0,
            "1": 0,
            "2": 0,
        }
        assert strict.terminate()[0] == 0
    assert await ledger_summary(stack) == _combined(now_expect, later_expect)
    assert await stack.dead_letters() == []
    verified = stack.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def _readyz(process: ConsumerProcess) -> tuple[int, str]:
    return await asyncio.to_thread(process.http, "/readyz")


async def _ready(process: ConsumerProcess) -> bool:
    return (await _readyz(process))[0] == 200


async def _metrics_show(process: ConsumerProcess, held_on: set[str]) -> bool:
    _, metrics = await asyncio.to_thread(process.http, "/metrics")
    lag = _gauges(metrics, "token_ledger_consumer_lag_records")
    held = _gauges(metrics, "token_ledger_uncommitted_records")
    return (
        set(lag) == {"0", "1", "2"}
        and not any(lag.values())
        and {p for p, n in held.items() if n > 0} == held_on
    )
