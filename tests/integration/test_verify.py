"""`verify` regroups the topic by thread through an external sort and compares one thread at a
time: it must find every kind of difference wherever it is in the order, whatever the number
of runs on disk, and read the offsets and the ledger in one snapshot so that it can run beside
consumers that are applying."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

import consumer.commands.reading
import consumer.commands.verify
from consumer.commands.replay import replay
from consumer.commands.spill import SortedSpill
from consumer.commands.verify import verify
from consumer.ledger.offsets import reset_offsets
from consumer.settings import Settings, load_settings
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from tests.factories import START
from tests.integration.harness import ConsumerProcess, Stack


class TinySpill(SortedSpill[Any]):
    """verify's spill with a budget of a few records, so nearly every record is a run on disk
    and the runs are merged before they are read."""

    most_runs = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, run_bytes=4_096, max_runs=4)

    def add(self, item: Any) -> None:
        super().add(item)
        TinySpill.most_runs = max(TinySpill.most_runs, self.runs)


async def _consumed(
    stack: Stack,
    tmp_path: Path,
    processes: list[ConsumerProcess],
    records: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Publish (the simulator's traffic unless given) and drain it into the ledger."""
    if records is None:
        records, _ = plan_traffic(
            TrafficConfig(threads=30, turns_per_thread=3, seed=27, start=START)
        )
    await stack.publish(records)
    drain = ConsumerProcess(stack.env(), tmp_path / "drain.log", "--until-idle").start()
    processes.append(drain)
    assert drain.wait() == 0, drain.logs()


async def test_differences_at_the_first_and_last_thread_and_in_between_are_all_found(
    kafka_bootstrap: str,
    ledger_url: str,
    processes: list[ConsumerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _consumed(stack, tmp_path, processes)
    monkeypatch.setattr(consumer.commands.verify, "SortedSpill", TinySpill)
    settings = _settings(stack)

    clean = await verify(settings)
    assert clean.ok, clean.differences
    assert TinySpill.most_runs >= 2  # the records went to disk in runs and came back merged
    assert clean.expected["threads"] == 30
    assert clean.expected == clean.actual

    conn = await stack.connect()
    try:
        first, last = await conn.fetchrow("SELECT min(id), max(id) FROM chat_threads")
        middle = await conn.fetchval(
            "SELECT thread_id FROM token_usage WHERE thread_id NOT IN ($1, $2)"
            " ORDER BY thread_id LIMIT 1",
            first,
            last,
        )
        rows_of_first = await conn.fetchval(
            "SELECT (SELECT count(*) FROM chat_messages WHERE thread_id = $1)"
            " + (SELECT count(*) FROM token_usage WHERE thread_id = $1)",
            first,
        )
        # The first thread vanishes (its rows cascade); a thread no event ever named follows the
        # last one; in between, one usage row is billed one micro more.
        await conn.execute("DELETE FROM chat_threads WHERE id = $1", first)
        await conn.execute(
            "INSERT INTO chat_threads (id, search_space_id, created_at, updated_at)"
            " VALUES ($1, 1, now(), now())",
            last + 1,
        )
        await conn.execute(
            "UPDATE token_usage SET cost_micros = cost_micros + 1"
            " WHERE id = (SELECT min(id) FROM token_usage WHERE thread_id = $1)",
            middle,
        )
    finally:
        await conn.close()

    corrupted = await verify(settings)
    assert not corrupted.ok
    found = {(d.table, d.key, d.problem) for d in corrupted.differences}
    assert ("chat_threads", f"thread {first}", "missing") in found
    assert ("chat_threads", f"thread {last + 1}", "unexpected") in found
    assert [d.problem for d in corrupted.differences if d.key.startswith(f"thread {middle} ")] == [
        "differs in cost_micros"
    ]
    first_thread = [d for d in corrupted.differences if d.key.split()[1] == str(first)]
    assert {d.problem for d in first_thread} == {"missing"}
    assert len(first_thread) == 1 + rows_of_first  # the thread and each of its rows
    assert corrupted.difference_count == len(corrupted.differences) == len(first_thread) + 2
    assert corrupted.actual["threads"] == corrupted.expected["threads"]  # one gone, one extra
    assert corrupted.actual["cost_micros"] != corrupted.expected["cost_micros"]


async def test_verify_beside_a_consumer_that_is_applying_finds_the_ledger_clean(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(
        TrafficConfig(threads=150, turns_per_thread=4, seed=28, poison_rate=0, start=START)
    )
    await stack.publish(records)
    # Small batches: the ledger and its offsets move many times while verify reads the topic.
    consumer_process = ConsumerProcess(stack.env(LEDGER_MAX_BATCH="10"), tmp_path / "c.log").start()
    processes.append(consumer_process)
    moved_during = 0
    for _ in range(3):
        before = sum((await stack.stored_offsets()).values())
        verified = await asyncio.to_thread(stack.cli, "verify")
        after = sum((await stack.stored_offsets()).values())
        assert verified.returncode == 0, verified.stdout + verified.stderr
        moved_during += before < after
        if await stack.caught_up():
            break
    assert moved_during >= 1, "the consumer never applied while verify ran"


def _settings(stack: Stack) -> Settings:
    return load_settings(
        kafka_bootstrap=stack.bootstrap,
        database_url=stack.database_url,
        topic=stack.topic,
        dlq_topic=stack.dlq_topic,
        group_id=stack.group_id,
    )


async def test_a_read_longer_than_the_idle_in_transaction_guard_is_not_cut_off(
    kafka_bootstrap: str,
    ledger_url: str,
    processes: list[ConsumerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The snapshot stays open while the topic is read (minutes for millions of records): a
    database that ends sessions idle in a transaction must not end verify's."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _consumed(stack, tmp_path, processes)
    conn = await stack.connect()
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f'ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = 500'
        )
    finally:
        await conn.close()
    read_range = consumer.commands.reading.read_range

    async def slow_topic(*args: Any) -> AsyncIterator[Any]:
        await asyncio.sleep(1.5)  # three times the guard, with the snapshot taken
        async for record in read_range(*args):
            yield record

    monkeypatch.setattr(consumer.commands.verify, "read_range", slow_topic)
    report = await verify(_settings(stack))
    assert report.ok, report.differences


async def test_records_larger_than_a_fetch_are_read_whole(
    kafka_bootstrap: str,
    ledger_url: str,
    processes: list[ConsumerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(TrafficConfig(threads=5, turns_per_thread=2, seed=3, start=START))
    large = []
    for key, value in records:
        body = json.loads(value)
        if body.get("type") == "turn.started":
            body["user_query"] = "x" * 300_000
        large.append((key, json.dumps(body).encode()))
    await _consumed(stack, tmp_path, processes, large)
    monkeypatch.setattr(consumer.commands.verify, "VERIFY_FETCH_BYTES", 10_000)
    report = await asyncio.wait_for(verify(_settings(stack)), 60)
    assert report.ok, report.differences
    assert report.records_read == len(large)


async def test_stored_offsets_past_the_end_of_the_log_are_read_up_to_it_not_waited_for(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """E.g. the topic was recreated under the ledger: verify reads what the log holds and
    compares the ledger with what is there."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _consumed(stack, tmp_path, processes)
    conn = await stack.connect()
    try:
        await conn.execute(
            "UPDATE consumer_offsets SET next_offset = next_offset + 5 WHERE group_id = $1",
            stack.group_id,
        )
    finally:
        await conn.close()
    report = await asyncio.wait_for(verify(_settings(stack)), 60)
    assert report.ok  # every record on the log is in the ledger, nothing more


async def test_after_a_replay_verify_still_compares_everything_the_ledger_holds(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """`replay` moves the stored offsets back, not the ledger: until the consumers pass the
    old position again, the ledger holds records past the stored offsets."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _consumed(stack, tmp_path, processes)
    settings = _settings(stack)
    before = await verify(settings)
    assert before.ok
    await replay(settings, to_offset=0)
    assert sum((await stack.stored_offsets()).values()) == 0
    after = await verify(settings)
    assert after.ok, after.differences
    assert after.records_read == before.records_read
    assert after.expected == before.expected

    # A consumer applying the range again leaves the same ledger, and moves nothing further.
    again = ConsumerProcess(stack.env(), tmp_path / "again.log", "--until-idle").start()
    processes.append(again)
    assert again.wait() == 0, again.logs()
    final = await verify(settings)
    assert final.ok
    assert final.expected == before.expected


async def test_a_replay_after_offsets_an_older_release_moved_still_compares_everything(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """During a rolling deploy (or after a rollback) a consumer of the previous release moves
    next_offset without applied_until, which it does not know; replay keeps the position it
    rewinds from."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _consumed(stack, tmp_path, processes)
    conn = await stack.connect()
    try:  # what the previous release's compare-and-set and first claim leave behind
        await conn.execute(
            "UPDATE consumer_offsets SET applied_until = 0 WHERE group_id = $1", stack.group_id
        )
    finally:
        await conn.close()
    settings = _settings(stack)
    before = await verify(settings)
    assert before.ok
    await replay(settings, to_offset=0)
    after = await verify(settings)
    assert after.ok, after.differences
    assert after.records_read == before.records_read


async def test_an_offset_reset_forward_after_a_replay_keeps_what_the_ledger_holds(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """The log's start moved past records that never reached the ledger (retention; here five
    undecodable records, dead-lettered), a replay rewinds below it, and LEDGER_OFFSET_RESET=
    earliest resets the partition forward to the log's start: the ledger still holds every
    record after it."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    junk = [(b"junk-%d" % i, b"not an event") for i in range(5)]
    records, _ = plan_traffic(
        TrafficConfig(threads=20, turns_per_thread=3, seed=42, poison_rate=0, start=START)
    )
    await _consumed(stack, tmp_path, processes, junk + records)
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(stack.topic, 0): RecordsToDelete(5)})
    finally:
        await admin.close()
    settings = _settings(stack)
    assert (await verify(settings)).ok

    await replay(settings, to_offset=0)
    conn = await stack.connect()
    try:  # what Checkpoint.out_of_range does with LEDGER_OFFSET_RESET=earliest
        await reset_offsets(conn, stack.group_id, stack.topic, 0, expected=0, next_offset=5)
    finally:
        await conn.close()
    after = await verify(settings)
    assert after.ok, after.differences
    assert after.records_read == len(records)
