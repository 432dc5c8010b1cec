"""Records and database answers that used to stop the consumer: each is now applied,
dead-lettered, retried or stops only its own partition — the process never exits for them."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from consumer.ledger.database import asyncpg_dsn
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer.client import ensure_topic
from tests.factories import START
from tests.integration.harness import (
    ConsumerProcess,
    Stack,
    expected_summary,
    ledger_summary,
    wait_for,
)


def _start(
    stack: Stack, processes: list[ConsumerProcess], path: Path, *args: str, **env: str
) -> ConsumerProcess:
    process = ConsumerProcess(stack.env(**env), path, *args).start()
    processes.append(process)
    return process


async def _send(
    stack: Stack, value: bytes, *, partition: int = 0, timestamp_ms: int | None = None
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.bootstrap,
        compression_type="zstd",
        max_request_size=16 * 1024 * 1024,  # checked uncompressed; the broker sees zstd bytes
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            stack.topic, value, key=b"1", partition=partition, timestamp_ms=timestamp_ms
        )
    finally:
        await producer.stop()


async def test_a_compressed_record_far_over_the_limit_is_dead_lettered_byte_for_byte(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    await stack.create_topic()
    huge = b'{"type":"turn.started","pad":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    await _send(stack, huge)  # a few hundred bytes on the wire
    consumer = _start(stack, processes, tmp_path / "c.log", "--until-idle")
    assert consumer.wait() == 0, consumer.logs()[-3000:]
    (letter,) = await stack.dead_letters()
    assert dict(letter.headers)["ledger.error.reason"] == b"too_large"
    assert letter.value == huge
    assert (await stack.stored_offsets())[0] == 1


async def test_a_dead_letter_the_topic_refuses_stops_only_its_partition(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=2)
    await stack.create_topic()
    consumer = _start(stack, processes, tmp_path / "c.log")
    await wait_for(lambda: _status(consumer, 200), within=60, what="ready", context=consumer.logs)
    # The operator shrinks the dead-letter topic under a running consumer.
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, stack.dlq_topic, configs={"max.message.bytes": "2000"}
                )
            ]
        )
    finally:
        await admin.close()
    # Invalid UTF-8, ~100 KB even with zstd: random bytes do not compress.
    incompressible = b"\xff" + random.Random(1).randbytes(100_000)
    await _send(stack, incompressible, partition=0)
    records, expect = plan_traffic(
        TrafficConfig(threads=10, turns_per_thread=2, seed=4, poison_rate=0, start=START)
    )
    await _send_all(stack, records, partition=1)

    async def stopped_for_the_refusal() -> bool:
        status, body = await asyncio.to_thread(consumer.http, "/readyz")
        return status == 503 and "partition 0 stopped: dead letter refused" in body

    # Not just any 503: a loaded machine may be not-ready for a moment for other reasons.
    await wait_for(
        stopped_for_the_refusal, within=60, what="partition 0 stopped", context=consumer.logs
    )
    _, metrics = consumer.http("/metrics")
    assert 'token_ledger_partition_halted{partition="0"} 1.0' in metrics
    # Partition 1 goes on; partition 0 stands before the record it cannot dead-letter.
    await wait_for(
        lambda: _stored_is(stack, 1, len(records)), within=60, what="partition 1 applied"
    )
    assert await ledger_summary(stack) == expected_summary(expect)
    assert (await stack.stored_offsets()).get(0) in (None, 0)
    errors = [json.loads(line) for line in consumer.logs().splitlines() if '"error"' in line]
    assert any(line["msg"] == "partition stopped" for line in errors)
    # Recorded with the ledger: `status` shows which partition stopped, and why.
    shown = await asyncio.to_thread(stack.cli, "status", "--format", "json")
    assert shown.returncode == 1, shown.stdout + shown.stderr
    reasons = [p["halt_reason"] for p in json.loads(shown.stdout)["partitions"]]
    assert reasons[1] is None and reasons[0].startswith("dead letter refused"), reasons
    code, seconds = consumer.terminate()
    assert code == 0 and seconds < 10


async def test_a_v0_record_stamped_beyond_year_9999_is_schema_invalid_not_a_crash(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    # Topic-level settings that let any timestamp through (Kafka 4 bounds them by default).
    await ensure_topic(
        stack.bootstrap,
        stack.topic,
        partitions=1,
        config={"message.timestamp.after.max.ms": str(2**63 - 1)},
    )
    v0 = {
        "type": "message.appended",
        "schema_version": 0,
        "thread_id": 7,
        "search_space_id": 7,
        "role": "user",
        "content": [{"type": "text", "text": "from the far future"}],
    }
    await _send(stack, json.dumps(v0).encode(), timestamp_ms=9_000_000_000_000_000)
    consumer = _start(stack, processes, tmp_path / "c.log", "--until-idle")
    assert consumer.wait() == 0, consumer.logs()[-3000:]
    (letter,) = await stack.dead_letters()
    assert dict(letter.headers)["ledger.error.reason"] == b"schema_invalid"
    verified = stack.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


SLOW_THREADS = """
CREATE FUNCTION slow_for_many() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT count(*) FROM new_rows) > 5 THEN PERFORM pg_sleep(2); END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER slow_for_many AFTER INSERT ON chat_threads
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION slow_for_many();
"""


async def test_a_batch_that_keeps_hitting_statement_timeout_is_committed_in_halves(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        # A database that is slow for big statements, and a server-side statement_timeout.
        await conn.execute(SLOW_THREADS)
        database = ledger_url.rpartition("/")[2]
        await conn.execute(f"ALTER DATABASE \"{database}\" SET statement_timeout = '1s'")
    finally:
        await conn.close()
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    records, expect = plan_traffic(
        TrafficConfig(threads=40, turns_per_thread=1, seed=8, poison_rate=0, start=START)
    )
    await stack.publish(records)
    consumer = _start(stack, processes, tmp_path / "c.log", "--until-idle", LEDGER_MAX_BATCH="500")
    assert consumer.wait(timeout=240) == 0, consumer.logs()[-3000:]
    assert await ledger_summary(stack) == expected_summary(expect)
    assert "batch keeps timing out: committing it in halves" in consumer.logs()


async def _send_all(stack: Stack, records: list[tuple[bytes, bytes]], *, partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(stack.topic, value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def _status(consumer: ConsumerProcess, status: int) -> bool:
    return await consumer.status("/readyz") == status


async def _stored_is(stack: Stack, partition: int, offset: int) -> bool:
    return (await stack.stored_offsets()).get(partition) == offset
