"""Benchmark: how fast the batch writer applies events, by batch size, against a baseline
measured in the same run (one transaction per event), plus a full redelivery of the same events.

    make services && .venv/bin/python -m bench.ledger_apply [--threads 300] [--repeat 3]

It uses LEDGER_DATABASE_URL's server and creates (and drops) its own database. Figures are
ratios against the baseline: absolute events/s depend on the machine, ratios much less.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from consumer.migrate import upgrade
from consumer.settings import load_settings
from consumer.store import apply_events, asyncpg_dsn
from producer.events import AnyEvent, Rejection, decode_event
from producer.simulator import TrafficConfig, plan_traffic

BATCH_SIZES = (1, 50, 500, 5000)


def _events(threads: int) -> list[AnyEvent]:
    records, _ = plan_traffic(
        TrafficConfig(
            threads=threads,
            turns_per_thread=5,
            seed=1,
            poison_rate=0,
            start=datetime(2026, 11, 26, tzinfo=UTC),
        )
    )
    published_ms = 1_795_800_000_000  # 2026-11-27: after every occurred_at of the plan
    decoded = [decode_event(value, timestamp_ms=published_ms) for _, value in records]
    return [e for e in decoded if not isinstance(e, Rejection)]


async def _apply_all(conn: asyncpg.Connection, events: list[AnyEvent], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(events), batch):
        async with conn.transaction():
            await apply_events(conn, events[i : i + batch])
    return time.perf_counter() - started


async def _run(threads: int, repeat: int) -> None:
    server_url = load_settings().database_url.get_secret_value()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rpartition("/")[0] + f"/{name}"
    try:
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        events = _events(threads)
        results: dict[str, float] = {}
        try:
            for batch in BATCH_SIZES:
                runs = []
                for _ in range(repeat):
                    await conn.execute("TRUNCATE token_usage, chat_messages, chat_threads")
                    runs.append(await _apply_all(conn, events, batch))
                results[f"fresh, batch {batch}"] = statistics.median(runs)
            # Everything again on a full ledger: the at-least-once redelivery case.
            runs = [await _apply_all(conn, events, 500) for _ in range(repeat)]
            results["redelivery, batch 500"] = statistics.median(runs)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()

    baseline = results["fresh, batch 1"]
    print(f"{len(events)} events, median of {repeat} runs; baseline: one transaction per event")
    print(f"{'scenario':26}{'seconds':>10}{'events/s':>12}{'vs baseline':>14}")
    for scenario, seconds in results.items():
        print(
            f"{scenario:26}{seconds:>10.3f}{len(events) / seconds:>12.0f}{baseline / seconds:>13.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(_run(args.threads, args.repeat))


if __name__ == "__main__":
    main()
