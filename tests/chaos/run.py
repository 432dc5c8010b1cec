"""The chaos run: three consumers of one group under kills, database and broker restarts,
rebalances, a database stall and poison, then the ledger reconciled exactly.

1. Start a dedicated broker (SASL listener for the consumers) and PostgreSQL; migrate.
2. Plan the traffic (seeded): duplicates, legacy appends (v1, v0), shuffles, re-sent v0
   bodies, re-stamped retries, poison from the corpus; the canary query among the queries.
3. Start the consumers; publish at a steady pace while the fault schedule runs.
4. Drain: every committed record applied (polled, with a deadline); stop every consumer.
5. Check: ledger == expectation row by row and per model; dead letters == poison by source
   position and reason; `token-ledger verify` clean; no partition stalled past the bound;
   every process ended; no secret in logs, dead-letter headers, /metrics or /readyz.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from consumer.failures import ExitCode
from consumer.simulate.config import QUERIES, Record, TrafficConfig
from consumer.simulate.expectation import Expectation
from consumer.simulate.traffic import plan_traffic
from producer.events import RejectReason
from tests.chaos import checks
from tests.chaos.faults import FaultHand, plan_faults
from tests.chaos.fleet import Fleet
from tests.chaos.monitor import Monitor
from tests.chaos.poison import MAX_EVENT_BYTES, PoisonDraws
from tests.chaos.publish import publish_paced
from tests.chaos.services import ChaosServices, Secrets
from tests.integration.harness import Stack, wait_for


@dataclass(frozen=True)
class ChaosConfig:
    seed: int = 1
    threads: int = 3_400  # about 15 records a thread: over 50,000 records
    publish_seconds: float = 75.0
    consumers: int = 3
    kills: int = 10
    kills_after_commit: int = 4
    postgres_modes: tuple[str, ...] = ("fast", "immediate")
    broker_restarts: int = 1
    leave_joins: int = 3
    stall_seconds: float = 20.0
    # The stated bound: no partition with records to read goes longer without progress. The
    # schedule may stack its faults: the broker's outage (~20 s with its restart), consumers
    # started meanwhile exiting 9 and restarted, a database restart, the 20 s lock, and a
    # rebalance after each kill (the dead member's session timeout, 10 s). Seen: 41-97 s.
    stall_bound: float = 120.0
    drain_within: float = 240.0


FULL = ChaosConfig()
# `make test`'s variant: fewer events and faults, the same checks.
SHORT = ChaosConfig(
    threads=400,
    publish_seconds=20.0,
    kills=3,
    kills_after_commit=1,
    postgres_modes=("immediate",),
    leave_joins=1,
    stall_seconds=5.0,
    stall_bound=60.0,
    drain_within=120.0,
)


def plan(config: ChaosConfig, secrets: Secrets) -> tuple[list[Record], Expectation, PoisonDraws]:
    draws = PoisonDraws(secrets.chat_text)
    traffic = TrafficConfig(
        threads=config.threads,
        turns_per_thread=5,
        seed=config.seed,
        duplicate_rate=0.2,
        legacy_rate=0.25,
        shuffle_rate=0.2,
        poison_rate=0.03,  # one poison in about 7 threads: about 1 % of the records
        restamp_rate=0.03,
        queries=(*QUERIES, secrets.user_query),
    )
    records, expect = plan_traffic(traffic, draws)
    return records, expect, draws


async def run_chaos(config: ChaosConfig, workdir: Path) -> dict[str, Any]:
    """One chaos run; its summary, whose `failures` is empty when every check held."""
    started = time.monotonic()
    rng = random.Random(config.seed)
    secrets = Secrets.for_seed(config.seed)
    # The postgres user must reach its data directory (mkdtemp makes it 0700).
    await asyncio.to_thread(workdir.chmod, 0o755)
    services = ChaosServices(workdir, secrets)
    fleet: Fleet | None = None
    try:
        await services.start()  # inside: a half-started pair is stopped too
        stack = Stack.fresh(services.broker.bootstrap, services.database_url)
        await stack.create_topic()
        records, expect, draws = plan(config, secrets)
        logdir = workdir / "logs"
        logdir.mkdir()
        env = {
            **services.consumer_env(),
            "LEDGER_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
            "LEDGER_STALL_SECONDS": "30",
        }
        fleet = Fleet(lambda: stack.env(**env), logdir)
        for slot in range(config.consumers):
            fleet.start(slot)
        monitor = Monitor(stack, fleet, secrets.all())
        stop_monitor = asyncio.Event()
        watching = asyncio.ensure_future(monitor.run(stop_monitor))
        hand = FaultHand(services, fleet, stack, rng, config.stall_seconds)
        schedule = plan_faults(
            rng,
            window=config.publish_seconds + 10,
            kills=config.kills,
            kills_after_commit=config.kills_after_commit,
            postgres_modes=config.postgres_modes,
            broker_restarts=config.broker_restarts,
            leave_joins=config.leave_joins,
        )
        supervising = asyncio.ensure_future(hand.supervise(stop_monitor))
        traffic_started = time.monotonic()
        resent, _ = await asyncio.gather(
            publish_paced(stack.bootstrap, stack.topic, records, config.publish_seconds),
            hand.run(schedule),
        )
        calm = time.monotonic()
        await wait_for(stack.caught_up, within=config.drain_within, what="the drain")
        drained = time.monotonic() - calm
        stop_monitor.set()
        await asyncio.gather(watching, supervising)
        await hand.settle()
        await monitor.scrape()
        final = await asyncio.to_thread(fleet.stop_all)
        summary = await _reconcile(stack, expect, draws, fleet, monitor, secrets, config)
        summary.update(
            seed=config.seed,
            config=asdict(config),
            events_planned=len(records),
            chunks_resent=resent,
            traffic_seconds=round(calm - traffic_started, 1),
            time_to_drain_s=round(drained, 1),
            max_lag_records=monitor.max_lag,
            max_stall_s=round(monitor.max_stall, 1),
            max_stall_window_s=[
                round(at - traffic_started, 1)
                for at in max(monitor.partitions.values(), key=lambda w: w.max_stall).stalled_at
            ],
            stall_bound_s=config.stall_bound,
            kills=hand.log.kills,
            kills_after_commit=hand.log.kills_after_commit,
            kills_before_mirror=hand.log.kills_before_mirror,
            postgres_restarts=hand.log.postgres_restarts,
            broker_restarts=hand.log.broker_restarts,
            leaves=hand.log.leaves,
            joins=hand.log.joins,
            db_stall_held_s=hand.log.stall_held,
            exits_on_their_own=hand.log.exits,
            final_stop=[{"process": n, "exit": c, "seconds": round(s, 1)} for n, c, s in final],
            timeline=hand.log.events,
        )
        summary["failures"] += _process_failures(fleet, final, hand.log.leaves)
        summary["failures"] += [
            f"{x['process']} exited {x['exit']} on its own"
            for x in hand.log.exits
            if x["exit"] != ExitCode.KAFKA_UNREACHABLE  # started while the broker was down
        ]
        if monitor.max_stall > config.stall_bound:
            summary["failures"].append(
                f"a partition stalled {monitor.max_stall:.1f} s > bound {config.stall_bound} s"
            )
        summary["wall_s"] = round(time.monotonic() - started, 1)
        return summary
    finally:
        if fleet is not None:
            fleet.kill_leftovers()
        await asyncio.to_thread(services.stop)


async def _reconcile(
    stack: Stack,
    expect: Expectation,
    draws: PoisonDraws,
    fleet: Fleet,
    monitor: Monitor,
    secrets: Secrets,
    config: ChaosConfig,
) -> dict[str, Any]:
    failures = await checks.check_ledger(stack, expect)
    dlq_failures, dlq = await checks.check_dead_letters(stack, draws.reasons)
    failures += dlq_failures
    letters = dlq.pop("_letters")
    absent = set(RejectReason) - {RejectReason(r) for r in dlq["dead_letters_by_reason"]}
    if absent:
        failures.append(f"no dead letter for {sorted(absent)}")
    verify = await asyncio.to_thread(stack.cli, "verify")
    if verify.returncode != 0:
        failures.append(f"verify exit {verify.returncode}: {verify.stdout[-1500:]}")
    logs = {m.name: m.process.logs() for m in fleet.members}
    texts = {
        **{f"log of {name}": text for name, text in logs.items()},
        "dead-letter headers": checks.dead_letter_headers(letters),
        "verify output": verify.stdout + verify.stderr,
    }
    failures += checks.check_secrets(texts, secrets.all()) + monitor.leaks
    return {
        "failures": failures,
        "threads": expect.threads,
        "messages": expect.messages,
        "usage_rows": expect.usage_rows,
        "duplicates_planned": expect.duplicates,
        "restamped_planned": expect.restamped,
        "poison_planned": expect.dead_letters,
        **dlq,
        "rebalances_observed": sum(log.count('"partitions assigned"') for log in logs.values()),
        "duplicates_suppressed": monitor.counter(
            "token_ledger_events_total", 'outcome="duplicate"'
        ),
        "fenced_batches": sum(log.count('"batch fenced"') for log in logs.values()),
        "db_retries_scraped": monitor.counter("token_ledger_db_retries_total"),
        "scrapes": monitor.scrapes,
        "verify": verify.stdout.strip().splitlines()[-1:] if verify.stdout.strip() else [],
    }


def _process_failures(
    fleet: Fleet, final: list[tuple[str, int, float]], leaves: list[dict[str, Any]]
) -> list[str]:
    failures = [
        f"{member.name} is still running"
        for member in fleet.members
        if member.process.process is not None and member.process.process.poll() is None
    ]
    for name, code, seconds in [*final, *(("a leave", x["exit"], x["seconds"]) for x in leaves)]:
        if code != 0 or seconds > 10:
            failures.append(f"{name}: SIGTERM gave exit {code} after {seconds:.1f} s")
    return failures
