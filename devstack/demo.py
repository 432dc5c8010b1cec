"""`make demo`: the whole pipeline on this machine, checked against the simulator.

Services up (devstack), a fresh demo database and fresh demo topics, migrations, the consumer
in the background, ~2,000 simulated turns with duplicates, legacy appends, shuffles and poison,
then a summary. Exits 0 only if the ledger matches what the simulator says it must be.
The consumer keeps running (its pid in .devstack/consumer.pid) so that its metrics can be
looked at; `make services-down` stops it with the services.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import asyncpg

from devstack.__main__ import CONSUMER_PID, STATE, stop_consumer, up
from devstack.errors import DevstackError
from devstack.processes import free_port, require_free_port

THREADS, TURNS = 400, 5


def _env_file() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (STATE / "ledger.env").read_text().splitlines() if line)
    return dict(pairs)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )


async def _reset_database(admin_url: str, name: str) -> str:
    dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rpartition("/")[0] + f"/{name}"


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def _ledger(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        return dict(
            await conn.fetchrow(
                "SELECT (SELECT count(*) FROM chat_threads) AS threads,"
                " (SELECT count(*) FROM chat_messages) AS messages,"
                " (SELECT count(*) FROM token_usage) AS usage_rows,"
                " (SELECT coalesce(sum(total_tokens), 0) FROM token_usage) AS total_tokens,"
                " (SELECT coalesce(sum(cost_micros), 0) FROM token_usage) AS total_cost_micros"
            )
        )
    finally:
        await conn.close()


async def _caught_up(url: str, group: str, topic: str, records: int) -> bool:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        applied = await conn.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
            " WHERE group_id = $1 AND topic = $2",
            group,
            topic,
        )
    finally:
        await conn.close()
    return int(applied) >= records


def demo() -> int:
    up()
    services = _env_file()
    stop_consumer()
    run = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    topic = f"demo-{run}.chat.turn-events"
    database_url = asyncio.run(_reset_database(services["LEDGER_DATABASE_URL"], "ledger_demo"))
    port = 9464
    try:
        require_free_port(port, "metrics")
    except DevstackError:
        port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_KAFKA_BOOTSTRAP": services["LEDGER_KAFKA_BOOTSTRAP"],
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_TOPIC": topic,
        "LEDGER_DLQ_TOPIC": f"{topic}.dlq",
        "LEDGER_GROUP_ID": f"token-ledger-demo-{run}",
        "LEDGER_METRICS_HOST": "127.0.0.1",  # a demo on a laptop need not face the network
        "LEDGER_METRICS_PORT": str(port),
    }
    print(f"\n== migrate ({database_url.rpartition('@')[2]})")
    migrated = _run(env, "migrate")
    print(migrated.stdout.strip() or migrated.stderr.strip())
    if migrated.returncode != 0:
        return 1

    print(f"== consumer in the background (log: {STATE / 'consumer.log'})")
    with open(STATE / "consumer.log", "ab") as log:
        consumer = subprocess.Popen(
            [sys.executable, "-m", "consumer", "consume"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    CONSUMER_PID.write_text(str(consumer.pid))

    expect_file = STATE / "demo-expected.json"
    print(f"== simulate {THREADS * TURNS} turns in {THREADS} threads")
    simulated = subprocess.run(
        [
            sys.executable,
            "-m",
            "consumer",
            "simulate",
            "--threads",
            str(THREADS),
            "--turns",
            str(TURNS),
            "--duplicate-rate",
            "0.15",
            "--legacy-rate",
            "0.1",
            "--shuffle-rate",
            "0.3",
            "--poison-rate",
            "0.004",
            "--seed",
            run,
            "--expect",
            str(expect_file),
        ],
        env=env,
        check=False,
    )
    if simulated.returncode != 0:
        return 1
    expected = json.loads(expect_file.read_text())

    print("== waiting for the consumer to catch up")
    deadline = time.monotonic() + 180
    while not asyncio.run(
        _caught_up(database_url, env["LEDGER_GROUP_ID"], topic, expected["records"])
    ):
        if consumer.poll() is not None or time.monotonic() > deadline:
            print(f"the consumer did not catch up; see {STATE / 'consumer.log'}")
            return 1
        time.sleep(0.5)

    ledger = asyncio.run(_ledger(database_url))
    metrics = _metrics(port)

    def count(outcome: str) -> int:
        return int(_metric_sum(metrics, "token_ledger_events_total", outcome=outcome))

    verified = _run(env, "verify")
    rows = [
        ("events applied", count("applied"), None),
        ("duplicates suppressed", count("duplicate"), None),
        ("superseded (lost a merge)", count("superseded"), None),
        ("dead-lettered", count("dead_lettered"), expected["dead_letters"]),
        ("threads", ledger["threads"], expected["threads"]),
        ("messages", ledger["messages"], expected["messages"]),
        ("usage rows", ledger["usage_rows"], expected["usage_rows"]),
        ("total tokens", ledger["total_tokens"], expected["total_tokens"]),
        ("total cost (micros)", ledger["total_cost_micros"], expected["total_cost_micros"]),
    ]
    print(f"\n{'':28}{'ledger':>14}{'expected':>14}")
    matches = True
    for name, actual, want in rows:
        ok = want is None or actual == want
        matches &= ok
        print(
            f"{name:28}{actual:>14}{'' if want is None else want:>14}{'' if ok else '  <-- MISMATCH'}"
        )
    print(f"\nverify: {'ledger matches the topic' if verified.returncode == 0 else 'DIFFERENCES'}")
    print(f"metrics: http://127.0.0.1:{port}/metrics   readiness: http://127.0.0.1:{port}/readyz")
    print(f"consumer still running (pid {consumer.pid}); `make services-down` stops everything")
    return 0 if matches and verified.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(demo())
