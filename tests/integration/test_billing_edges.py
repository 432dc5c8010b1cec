"""The billing stream at its edges (docs/contract.md#billing-stream): a revision the topic refuses, a hung
broker, usage older than the outbox."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from producer.client import ensure_topic, thread_key
from producer.events import USAGE_MEASURES, AnyEvent, encode_event
from tests.factories import appended, call, finalized, ledger_events, started
from tests.integration.harness import REPO, ConsumerProcess, Stack, said, wait_for

MEASURES = USAGE_MEASURES


def records_of(*events: AnyEvent) -> list[tuple[bytes, bytes]]:
    return [(thread_key(event.thread_id), encode_event(event)) for event in events]


def consume_until_idle(stack: Stack, **env: str) -> None:
    run = stack.cli("consume", "--until-idle", **env)
    assert run.returncode == 0, run.stderr


def big_breakdown(models: int = 300) -> dict[str, dict[str, Any]]:
    """A legacy per-model breakdown of ~55 KB that compresses poorly (random model names): a
    legitimate usage whose revision is larger than a billing topic provisioned with
    max.message.bytes=20000 accepts, even compressed."""
    return {
        f"model-{i:03d}-" + secrets.token_urlsafe(120): {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "total_tokens": 2,
            "cost_micros": 1,
        }
        for i in range(models)
    }


async def _small_billing_topic(stack: Stack) -> None:
    """The billing topic as a platform team provisioned it (ensure_topic leaves it as is)."""
    await ensure_topic(
        stack.bootstrap, stack.billing_topic, partitions=3, config={"max.message.bytes": "20000"}
    )


async def _revision_1_big_revision_2_small(stack: Stack) -> None:
    """One message: revision 1 (legacy append, big breakdown), its reversal (revision 2: the
    finalize comes later) and revision 3 (the server's finalize, small), all pending in the
    outbox (written with the relay off)."""
    await stack.publish(
        records_of(started(), appended(cost=777, seconds=5, breakdown=big_breakdown()))
    )
    consume_until_idle(stack, LEDGER_RELAY="false")
    await stack.publish(records_of(finalized(calls=[call(cost=500)], seconds=10)))
    consume_until_idle(stack, LEDGER_RELAY="false")
    conn = await stack.connect()
    try:
        pending = await conn.fetch(
            "SELECT usage_id, revision FROM billing_outbox WHERE published_at IS NULL ORDER BY id"
        )
    finally:
        await conn.close()
    assert [r["revision"] for r in pending] == [1, 2, 3]


async def test_a_refused_revision_never_lets_a_later_revision_of_its_message_out_first(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _small_billing_topic(stack)
    await _revision_1_big_revision_2_small(stack)

    relay = ConsumerProcess(stack.env(), tmp_path / "relay.log", command="relay").start()
    processes.append(relay)

    async def refused() -> bool:
        return "billing revision held back" in relay.logs()

    await wait_for(refused, within=60, what="revision 1 refused", context=relay.logs)
    assert relay.logs().count("billing revision held back") == 1  # once, not once a pass
    seen: list[str] = [json.loads(r.value)["id"] for r in await stack.billing_records()]
    assert seen == []  # revision 1 refused: revisions 2 and 3 wait behind it
    for position, event_id in enumerate(seen):
        usage, _, revision = event_id.partition(":")
        if int(revision) > 1:
            # In revision order per message (docs/contract.md#billing-stream): n-1 before n.
            assert f"{usage}:{int(revision) - 1}" in seen[:position], seen


async def test_a_refused_revision_holds_back_no_other_message_sharing_its_batch(
    kafka_bootstrap: str, ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """Revisions go out in batches per partition: a batch the topic finds too large must not
    refuse a small revision of another message that the topic takes (same thread, so the same
    key and partition, below half a batch: they share one)."""
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _small_billing_topic(stack)
    await stack.publish(
        records_of(
            started(),
            appended(cost=777, seconds=5, breakdown=big_breakdown()),
            started(turn_id="4242:2", seconds=20),
            appended(cost=5, seconds=25, turn_id="4242:2"),
        )
    )
    consume_until_idle(stack, LEDGER_RELAY="false")
    relay = ConsumerProcess(stack.env(), tmp_path / "relay.log", command="relay").start()
    processes.append(relay)

    async def small_one_published() -> bool:
        return len(await stack.billing_records()) == 1

    await wait_for(small_one_published, within=60, what="the small revision", context=relay.logs)
    (record,) = await stack.billing_records()
    assert json.loads(record.value)["data"]["cost_micros"] == 5
    held = [line for line in relay.logs().splitlines() if "billing revision held back" in line]
    assert len(held) == 1, held  # the big one only


async def test_until_idle_ends_when_a_revision_cannot_be_published(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await _small_billing_topic(stack)
    await stack.publish(
        records_of(started(), appended(cost=777, seconds=5, breakdown=big_breakdown()))
    )
    try:
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "consumer", "consume", "--until-idle"],
            cwd=REPO,
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"consume --until-idle still running after 60s: {hung.stderr!r}"[-3000:])
    # Like a dead letter the topic refuses: a failure exit that names the cause.
    assert run.returncode == 1, run.stderr
    assert said(run.stderr.strip().splitlines()[-1]).startswith(
        "token-ledger: billing revisions held back: "
    ), run.stderr


class SilentKafka:
    """A TCP listener that accepts and never answers: a hung broker."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()


async def test_relay_sigterm_with_kafka_hung_exits_0_within_10s(
    ledger_url: str, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    silent = SilentKafka()
    try:
        stack = Stack.fresh(f"127.0.0.1:{silent.port}", ledger_url)
        relay = ConsumerProcess(stack.env(), tmp_path / "relay.log", command="relay").start()
        processes.append(relay)

        async def connected() -> bool:
            return bool(silent.connections)

        await wait_for(connected, within=60, what="the relay reaching Kafka", context=relay.logs)
        try:
            code, seconds = await asyncio.to_thread(relay.terminate)
        except subprocess.TimeoutExpired:
            pytest.fail("relay still running 30 s after SIGTERM\n" + relay.logs()[-3000:])
        assert (code, seconds < 10) == (0, True), (code, seconds, relay.logs()[-3000:])
    finally:
        silent.close()


async def test_usage_that_exists_when_0003_runs_is_billed(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url, "0002")
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # Today's write path stands in for an older release's: it locks the budgets of the
        # usage's spaces, which 0002 has no table for, so a stand-in holds none for it.
        await conn.execute("CREATE TABLE budgets (id bigint, search_space_id bigint, user_id uuid)")
        async with conn.transaction():
            await apply_events(conn, ledger_events([started(), appended(cost=777, seconds=5)]))
        await conn.execute("DROP TABLE budgets")
        await conn.close()
        await asyncio.to_thread(upgrade, database_url, "head")
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        async with conn.transaction():  # the server's finalize supersedes it
            await apply_events(conn, ledger_events([finalized(calls=[call(cost=500)], seconds=10)]))
        row = await conn.fetchrow("SELECT cost_micros, revision FROM token_usage")
        deltas = await conn.fetchval(
            "SELECT coalesce(sum(delta_cost_micros), 0) FROM billing_outbox"
        )
    finally:
        await conn.close()
    assert row["revision"] == 3  # the finalize is later: a reversal, then its own revision
    assert deltas == row["cost_micros"], f"billed {deltas}, ledger {row['cost_micros']}"
