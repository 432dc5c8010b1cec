"""`make demo`: the whole pipeline on this machine, checked against the simulator.

Services up (devstack), a fresh demo database and fresh demo topics, migrations, the consumer
in the background, ~2,000 simulated turns with every shape the contract allows at the
simulator's default rates (duplicates and later retries, legacy appends whose breakdown is full,
partial, `{}` or null, v0 bodies re-sent later, fields the consumer does not know, shuffles,
poison), then a summary: the count of each shape published, and the ledger against the
simulator's expectation and the cost/token counters against the ledger. Exits 0 only if they
all match and `token-ledger verify` finds the ledger clean.
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

from consumer.commands.queries import usage_report
from consumer.simulate.expectation import UNKNOWN_CALL_FIELDS, UNKNOWN_PART_FIELD
from devstack.__main__ import CONSUMER_PID, STATE, stop_consumer, up
from devstack.errors import DevstackError
from devstack.processes import free_port, require_free_port
from producer.events import USAGE_MEASURES

THREADS, TURNS = 400, 5
SHAPE_LABELS = {
    "finalized_twice": "turns finalized twice",
    "shuffled_threads": "threads shuffled",
    "legacy_shadowing_a_turn": "legacy appends shadowing a turn",
    "legacy_turnless_v1": "turn-less legacy messages (v1)",
    "v0_bodies": "v0 bodies",
    "legacy_usage_full": "legacy usage: full breakdown",
    "legacy_usage_partial": "legacy usage: partial per model",
    "legacy_usage_empty": "legacy usage: breakdown {}",
    "legacy_usage_null": "legacy usage: breakdown null",
    "duplicates_right_after": "copies published right after",
    "retries_later": "retries re-sent later",
    "v0_resent_later": "v0 bodies re-sent later",
    "unknown_call_fields": "calls with unknown fields",
    "unknown_part_fields": "content parts with unknown fields",
    "unknown_envelope_fields": "envelopes with unknown fields",
    "poison": "poison records",
}
# token_ledger_tokens_total's `kind` label for each measure of a usage row.
TOKEN_KINDS = {
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "total_tokens": "total",
}


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


def _net(metrics: str, name: str, **labels: str) -> int:
    """A token or cost counter net of its reversals: what is authoritative in the ledger."""
    counted = _metric_sum(metrics, f"token_ledger_{name}_total", **labels)
    return int(counted - _metric_sum(metrics, f"token_ledger_{name}_reversed_total", **labels))


async def kept_unknown_fields(conn: asyncpg.Connection) -> dict[str, int]:
    """What the ledger kept of the fields the simulator adds that this consumer does not know
    (the simulator's Expectation.kept_unknown_fields): sums over the stored usage calls, and
    the content parts that carry one."""
    sums = ", ".join(
        f"coalesce(sum((c->>'{name}')::bigint), 0) AS \"call_details.{name}\""
        for name in UNKNOWN_CALL_FIELDS
    )
    # Assembled from the simulator's constant field names only.
    query = (
        f"SELECT {sums} FROM token_usage AS u CROSS JOIN LATERAL jsonb_array_elements("  # noqa: S608
        "  CASE jsonb_typeof(u.call_details->'calls')"
        "  WHEN 'array' THEN u.call_details->'calls' ELSE '[]' END) AS c"
    )
    kept = dict(await conn.fetchrow(query))
    kept[f"content.{UNKNOWN_PART_FIELD}"] = await conn.fetchval(
        "SELECT count(*) FROM chat_messages AS m CROSS JOIN LATERAL"
        " jsonb_array_elements(m.content) AS p WHERE p ? $1",
        UNKNOWN_PART_FIELD,
    )
    return {name: int(value) for name, value in kept.items()}


async def _ledger(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        ledger = dict(
            await conn.fetchrow(
                "SELECT (SELECT count(*) FROM chat_threads) AS threads,"
                " (SELECT count(*) FROM chat_messages) AS messages,"
                " (SELECT count(*) FROM token_usage) AS usage_rows,"
                " (SELECT coalesce(sum(total_tokens), 0) FROM token_usage) AS total_tokens,"
                " (SELECT coalesce(sum(cost_micros), 0) FROM token_usage) AS total_cost_micros"
            )
        )
        by_model = await usage_report(conn, ["model"])
        ledger["per_model"] = {r["model"]: {m: r[m] for m in USAGE_MEASURES} for r in by_model}
        ledger["kept_unknown_fields"] = await kept_unknown_fields(conn)
        return ledger
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

    print(f"\n{'published':36}{'count':>14}")
    for name, published in expected["shapes"].items():
        print(f"{SHAPE_LABELS.get(name, name):36}{published:>14}")

    print("\n== waiting for the consumer to catch up")
    deadline = time.monotonic() + 180
    records: int = expected["records"]

    def counted_every_record() -> bool:  # metrics move after the commit that moves offsets
        return _metric_sum(_metrics(port), "token_ledger_batch_size_sum") >= records

    while not (
        asyncio.run(_caught_up(database_url, env["LEDGER_GROUP_ID"], topic, records))
        and counted_every_record()
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
    # name, ledger, expected (None: not predicted), counters net of reversals (None: n/a)
    rows: list[tuple[str, int, int | None, int | None]] = [
        ("events applied", count("applied"), None, None),
        ("duplicates suppressed", count("duplicate"), None, None),
        ("superseded (lost a merge)", count("superseded"), None, None),
        ("dead-lettered", count("dead_lettered"), expected["dead_letters"], None),
        ("threads", ledger["threads"], expected["threads"], None),
        ("messages", ledger["messages"], expected["messages"], None),
        ("usage rows", ledger["usage_rows"], expected["usage_rows"], None),
        (
            "total tokens",
            ledger["total_tokens"],
            expected["total_tokens"],
            _net(metrics, "tokens", kind="total"),
        ),
        (
            "total cost (micros)",
            ledger["total_cost_micros"],
            expected["total_cost_micros"],
            _net(metrics, "cost_micros"),
        ),
        *(
            (f"kept {name}", ledger["kept_unknown_fields"].get(name, 0), want, None)
            for name, want in expected["kept_unknown_fields"].items()
        ),
    ]
    print(f"\n{'':36}{'ledger':>14}{'expected':>14}{'counters':>14}")
    matches = True
    for name, actual, want, counted in rows:
        ok = (want is None or actual == want) and (counted is None or counted == actual)
        matches &= ok
        print(
            f"{name:36}{actual:>14}{'' if want is None else want:>14}"
            f"{'' if counted is None else counted:>14}{'' if ok else '  <-- MISMATCH'}"
        )
    print(f"\n{'cost (micros) by model':36}{'ledger':>14}{'expected':>14}{'counters':>14}")
    for model in sorted(set(ledger["per_model"]) | set(expected["per_model"])):
        actual_model: dict[str, int] = ledger["per_model"].get(model, {})
        want_model: dict[str, int] = expected["per_model"].get(model, {})
        counters = {m: _net(metrics, "tokens", model=model, kind=k) for m, k in TOKEN_KINDS.items()}
        counters["cost_micros"] = _net(metrics, "cost_micros", model=model)
        ok = actual_model == want_model == counters
        matches &= ok
        print(
            f"{model:36}{actual_model.get('cost_micros', '-'):>14}"
            f"{want_model.get('cost_micros', '-'):>14}{counters['cost_micros']:>14}"
            f"{'' if ok else '  <-- MISMATCH'}"
        )
    print(f"\nverify: {'ledger matches the topic' if verified.returncode == 0 else 'DIFFERENCES'}")
    print(f"metrics: http://127.0.0.1:{port}/metrics   readiness: http://127.0.0.1:{port}/readyz")
    print(f"consumer still running (pid {consumer.pid}); `make services-down` stops everything")
    return 0 if matches and verified.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(demo())
