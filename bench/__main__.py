"""`make bench`: the consumer end to end, against a baseline commit measured in the same run.

    .venv/bin/python -m bench [--runs 3] [--records 200000] [--full] [--baseline add7224]
                              [--api-rows 1000000] [--api-spaces 1000] [--api-requests 200]
                              [--api-only]

Everything runs on a throw-away Kafka broker and PostgreSQL started for the benchmark
(bench/services.py). The baseline and the candidate (HEAD unless given) are commits' trees,
exported with `git archive` into .bench/ and run with the same interpreter and dependencies
(each with the native module of its own commit: bench/native.py), interleaved run by run, so
both see the same machine and the same noise: compare the ratios, not the absolute figures.
Each figure is the median of --runs with min and max.

A quick run: drains of the backlog (first, and again after `replay --to-offset 0`), the raw
read, the COPY and naive bounds, produce -> commit latency for --runs of 15 s, 1-3 consumers
(one run each), and the usage API (bench/api.py): p50/p99 of --api-requests GET /v1/usage per
run against `serve` over a ledger of --api-rows usage rows, and the candidate's first drain with
and without the API's index. --full: the latency over one run of 60 s, and the candidate's peak
RSS draining 1,000,000 records, then verifying them. --api-only: the backlog and the usage API
alone. Writes the Markdown table to stdout and everything to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.api import ApiPlan, index_cost, measure_api
from bench.backlog import Backlog, publish_backlog
from bench.budgets import budgets_cost
from bench.ceilings import copy_ceiling, naive, raw_read
from bench.consumers import Consumer, Tree
from bench.latency import produce_to_commit
from bench.native import build_native
from bench.report import LATENCY_RATE, MILLION, POISON, Results, summary, table
from bench.services import Databases, Services, running_services

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
NAIVE_RECORDS = 3_000
# Poison records per turn for the POISON backlog: with ~12.7 good records a thread, 1.1 a turn
# (5.5 a thread) makes 30 % of the records poison.
POISON_RATE = 1.1
POISON_SHARE = (0.27, 0.33)  # what the POISON label promises, checked on the backlog


def export(commit: str, name: str) -> Tree:
    """The tree of `commit`, as committed, with the native module of its own native/: edits
    made while the benchmark runs never leak into it."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", commit],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = ROOT / ".bench" / commit
    if not (target / "consumer").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        # As installed code runs: compiled once, not at every start (the tree's pyc files are
        # not written when PYTHONDONTWRITEBYTECODE is set).
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(target)], check=True
        )
    build_native(target)
    return Tree(f"{name} {commit}", target)


async def ledger_totals(url: str) -> dict[str, int]:
    import asyncpg

    from consumer.ledger.database import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM chat_threads) AS threads,"
            " (SELECT count(*) FROM chat_messages) AS messages,"
            " (SELECT count(*) FROM token_usage) AS usage_rows,"
            " (SELECT coalesce(sum(cost_micros), 0) FROM token_usage) AS cost_micros"
        )
        return {k: int(v) for k, v in dict(row).items()}
    finally:
        await conn.close()


class Bench:
    def __init__(self, services: Services, args: argparse.Namespace, trees: list[Tree]) -> None:
        self.services = services
        self.args = args
        self.trees = trees
        self.databases = Databases(services)
        self.results = Results()
        self._groups = 0

    def consumer(self, tree: Tree, url: str, topic: str) -> Consumer:
        self._groups += 1
        return Consumer(tree, self.services, url, topic, f"bench-{self._groups}")

    async def drains(self, topic: str, records: int) -> str:
        """First drain and re-drain, trees interleaved run by run; returns the URL of the
        candidate's last drained ledger (kept for the COPY bound)."""
        kept = ""
        for run in range(self.args.runs):
            order = self.trees if run % 2 == 0 else self.trees[::-1]
            totals = {}
            for tree in order:
                url = await self.databases.fresh()
                consumer = self.consumer(tree, url, topic)
                first = await consumer.drain()
                totals[tree.name] = await ledger_totals(url)
                consumer.run("replay", "--to-offset", "0")
                again = await consumer.drain()
                if await ledger_totals(url) != totals[tree.name]:
                    raise RuntimeError(f"{tree.name}: the re-drain changed the ledger")
                self.results.drain(tree.name, "first drain", first, records)
                self.results.drain(tree.name, "re-drain", again, records)
                print(f"run {run + 1} {tree.name}: first {first}, again {again}", flush=True)
                if tree is self.trees[-1] and run == self.args.runs - 1:
                    kept = url
                else:
                    await self.databases.drop(url)
            if len(set(map(json.dumps, totals.values()))) != 1:
                raise RuntimeError(f"the trees wrote different ledgers: {totals}")
            self.results.ledger = next(iter(totals.values()))
        return kept

    async def run(self) -> None:
        args = self.args
        started = time.monotonic()
        backlog = await publish_backlog(
            self.services.bootstrap,
            "bench.backlog",
            records=args.records,
            partitions=6,
            sample=NAIVE_RECORDS,
        )
        self.results.records = backlog.records
        print(f"backlog: {backlog.records} records on 6 partitions", flush=True)
        if args.api_only:
            await self.api(backlog)
            self.results.seconds = time.monotonic() - started
            return
        if args.budgets_only:
            await self.budgets(backlog)
            self.results.seconds = time.monotonic() - started
            return
        for _ in range(args.runs):
            self.results.add(
                "raw aiokafka read",
                "records/s",
                _rate(await raw_read(self.services.bootstrap, backlog.topic, backlog.partitions)),
            )
        drained = await self.drains(backlog.topic, backlog.records)
        poisoned = await publish_backlog(
            self.services.bootstrap,
            "bench.poison",
            records=args.records,
            partitions=6,
            sample=0,
            poison_rate=POISON_RATE,
        )
        share = poisoned.poison / poisoned.records
        print(f"poison backlog: {poisoned.poison} of {poisoned.records} records", flush=True)
        # A backlog of a few threads (--records in the hundreds) lands anywhere near it.
        if poisoned.records >= 1_000 and not POISON_SHARE[0] <= share <= POISON_SHARE[1]:
            raise RuntimeError(f"the poison backlog is {share:.1%} poison, not {POISON}")
        for run in range(args.runs):
            for tree in self.trees if run % 2 == 0 else self.trees[::-1]:
                url = await self.databases.fresh()
                drain = await self.consumer(tree, url, poisoned.topic).drain()
                await self.databases.drop(url)
                self.results.drain(tree.name, POISON, drain, poisoned.records)
        for _ in range(args.runs):
            empty = await self.databases.fresh()
            bound = await copy_ceiling(self.services, drained, empty)
            await self.databases.drop(empty)
            self.results.add("PostgreSQL COPY ceiling", "events/s", backlog.records / bound.seconds)
            self.results.add(
                "PostgreSQL COPY ceiling",
                "PostgreSQL µs/event",
                bound.pg_cpu_seconds / backlog.records * 1e6,
            )
        await self.databases.drop(drained)
        for _ in range(args.runs):
            url = await self.databases.fresh()
            slow = await naive(self.services, url, backlog.sample)
            await self.databases.drop(url)
            self.results.add("naive: a transaction per event", "events/s", _rate(slow))
        # --full: one minute each (60,000 samples); quick: --runs of 15 s.
        seconds, runs = (60.0, 1) if args.full else (15.0, args.runs)
        for tree in self.trees:
            for run in range(runs):
                url = await self.databases.fresh()
                consumer = self.consumer(tree, url, f"bench.latency.{self._groups}")
                latency = await produce_to_commit(consumer, rate=LATENCY_RATE, seconds=seconds)
                await self.databases.drop(url)
                self.results.latency(tree.name, latency)
                print(f"latency {tree.name} run {run + 1}: {latency}", flush=True)
        candidate = self.trees[-1]
        for processes in (1, 2, 3):  # one run each: 1-3 members side by side, not a median
            url = await self.databases.fresh()
            drain = await self.consumer(candidate, url, backlog.topic).drain(processes)
            await self.databases.drop(url)
            self.results.drain(candidate.name, f"{processes} consumer(s)", drain, backlog.records)
        await self.api(backlog)
        await self.budgets(backlog)
        if args.full:
            await self.million()
        self.results.seconds = time.monotonic() - started

    async def api(self, backlog: Backlog) -> None:
        """The usage API of the candidate (the baseline may predate it), and its index's cost
        to the candidate's first drain."""
        args, candidate = self.args, self.trees[-1]
        plan = ApiPlan(args.api_rows, args.api_spaces, args.api_requests, args.runs)
        await measure_api(self.services, self.databases, self.results, candidate, plan)
        await index_cost(
            self.databases,
            self.results,
            self.consumer,
            candidate,
            backlog.topic,
            backlog.records,
            args.runs,
        )

    async def budgets(self, backlog: Backlog) -> None:
        """What 10,000 budgets cost the candidate's first drain (the baseline predates them)."""
        await budgets_cost(
            self.databases,
            self.results,
            self.consumer,
            self.trees[-1],
            backlog.topic,
            backlog.sample,
            backlog.records,
            self.args.runs,
        )

    async def million(self) -> None:
        big = await publish_backlog(
            self.services.bootstrap, "bench.million", records=1_000_000, partitions=6, sample=0
        )
        for tree in self.trees[1:]:  # the candidate: the target is its peak RSS
            url = await self.databases.fresh()
            consumer = self.consumer(tree, url, big.topic)
            drain = await consumer.drain()
            self.results.drain(tree.name, MILLION, drain, big.records)
            print(f"million {tree.name}: {drain}", flush=True)
            # verify streams the topic with bounded memory: its peak counts against the target.
            checked = await consumer.measure(("verify",))
            await self.databases.drop(url)
            self.results.add("verify 1,000,000 records", "seconds", checked.seconds, tree.name)
            self.results.add(
                "verify 1,000,000 records", "peak RSS MiB", checked.peak_rss_kib / 1024, tree.name
            )
            print(f"verify {tree.name}: {checked}", flush=True)


def _rate(ceiling: Any) -> float:
    return float(ceiling.items / ceiling.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--full", action="store_true", help="60 s latency, 1,000,000 records")
    parser.add_argument("--baseline", default="add7224", help="commit to compare against")
    parser.add_argument("--candidate", default="HEAD", help="commit to measure")
    parser.add_argument("--api-rows", type=int, default=1_000_000, help="usage rows served")
    parser.add_argument("--api-spaces", type=int, default=1_000, help="their search spaces")
    parser.add_argument("--api-requests", type=int, default=200, help="requests timed per run")
    parser.add_argument("--api-only", action="store_true", help="the usage API alone")
    parser.add_argument(
        "--budgets-only", action="store_true", help="what 10,000 budgets cost the consumer alone"
    )
    args = parser.parse_args()
    trees = [export(args.baseline, "baseline"), export(args.candidate, "candidate")]
    with running_services() as services:
        bench = Bench(services, args, trees)
        try:
            asyncio.run(bench.run())
        finally:  # what was measured before a failure is kept, marked incomplete
            _write(bench, args, trees)


def _write(bench: Bench, args: argparse.Namespace, trees: list[Tree]) -> None:
    results = bench.results
    meta = {
        "runs": args.runs,
        "full": args.full,
        "records": results.records,
        "baseline": args.baseline,
        "candidate": trees[1].name,
        "machine": f"{platform.machine()}, {_cores()} cores",
        "ledger": results.ledger,
        "api": results.api,
        "seconds": round(results.seconds),
        "complete": results.seconds > 0,  # set when every scenario ran
    }
    rendered = table(results, trees[0].name, trees[1].name)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"meta": meta, "figures": summary(results), "table": rendered}, indent=2) + "\n"
    )
    print(rendered)
    print(f"\n{json.dumps(meta)}\nwritten to {RESULTS.relative_to(ROOT)}")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
