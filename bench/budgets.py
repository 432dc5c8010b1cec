"""What budgets cost the consumer under `make bench` (docs/development.md#budgets): first drains
of the candidate into an empty ledger with `BUDGETS` budgets and with none, interleaved run by
run on the same backlog; each run's pair gives the rate the budgets cost.

The budgets are those an operator of the simulated traffic would keep: each search space's own
for a day, a month and all time (every usage row falls under three of them), and per-user
budgets for the users of the backlog's first records (their usage falls under three more), the
rest per-user budgets of users who send nothing (each usage row's budgets are found among all
of them). Limits are set so that thresholds are crossed while the backlog drains: the alerts
are written and relayed like any.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import asyncpg

from bench.consumers import Consumer, Tree
from bench.report import BUDGETED, BUDGETS_COST, LOST, UNBUDGETED, Results, rate_lost
from bench.services import Databases
from consumer.ledger.database import asyncpg_dsn

BUDGETS = 10_000
PERIODS = ("day", "month", "total")
SPACES = range(1, 6)  # the simulator's default search spaces (TrafficConfig.search_spaces)
# Limits a few hundred turns reach (the simulator's calls cost micros in the thousands).
COST_LIMIT = 50_000_000
TOKENS_LIMIT = 5_000_000
# Users who send nothing: never one of the backlog's (random) ones.
QUIET = uuid.UUID("6f1b0c6e-9d7e-4c0a-8f3e-2b9a1d4c7e55")


def users_of(sample: list[tuple[bytes, bytes]]) -> list[tuple[int, uuid.UUID]]:
    """(space, user) of the records that name both, in order of first appearance."""
    seen: dict[tuple[int, uuid.UUID], None] = {}
    for _, value in sample:
        try:
            document = json.loads(value)
            scope = (int(document["search_space_id"]), uuid.UUID(str(document["user_id"])))
        except (ValueError, KeyError, TypeError):
            continue  # poison, a body without a user
        seen.setdefault(scope, None)
    return list(seen)


def budget_rows(users: list[tuple[int, uuid.UUID]]) -> list[tuple[int, uuid.UUID | None, str]]:
    """BUDGETS (space, user, period) scopes: the spaces', the sample's users', then users who
    send nothing."""
    rows: list[tuple[int, uuid.UUID | None, str]] = [
        (space, None, period) for space in SPACES for period in PERIODS
    ]
    rows += [(space, user, period) for space, user in users for period in PERIODS]
    quiet = 0
    while len(rows) < BUDGETS:
        space = SPACES[quiet % len(SPACES)]
        rows.append((space, uuid.uuid5(QUIET, str(quiet)), PERIODS[quiet % len(PERIODS)]))
        quiet += 1
    return rows[:BUDGETS]


async def _budgets(url: str, rows: list[tuple[int, uuid.UUID | None, str]]) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if rows:
            await conn.execute(
                "INSERT INTO budgets (search_space_id, user_id, period, cost_micros_limit,"
                " total_tokens_limit)"
                " SELECT s, u, p, $4, $5 FROM unnest($1::bigint[], $2::uuid[], $3::text[])"
                " AS b(s, u, p)",
                [space for space, _, _ in rows],
                [user for _, user, _ in rows],
                [period for _, _, period in rows],
                COST_LIMIT,
                TOKENS_LIMIT,
            )
        found = await conn.fetchval("SELECT count(*) FROM budgets")
        if found != len(rows):
            raise RuntimeError(f"{found} budgets where {len(rows)} were meant")
    finally:
        await conn.close()


async def budgets_cost(
    databases: Databases,
    results: Results,
    consumer: Callable[[Tree, str, str], Consumer],  # Bench.consumer: a group of its own
    tree: Tree,
    topic: str,
    sample: list[tuple[bytes, bytes]],
    records: int,
    runs: int,
) -> None:
    """First drains with the budgets and without, in alternating order run by run; each run's
    pair gives the rate they cost (the pairs, not each side's median, take out what else runs
    on the machine)."""
    rows = budget_rows(users_of(sample))
    for run in range(runs):
        rates: dict[bool, float] = {}
        for budgeted in (True, False) if run % 2 == 0 else (False, True):
            url = await databases.fresh()
            await _budgets(url, rows if budgeted else [])
            drain = await consumer(tree, url, topic).drain()
            await databases.drop(url)
            scenario = BUDGETED if budgeted else UNBUDGETED
            rates[budgeted] = records / drain.seconds
            results.drain(tree.name, scenario, drain, records)
            print(f"budgets run {run + 1}, {scenario}: {drain}", flush=True)
        results.add(BUDGETS_COST, LOST, rate_lost(rates[True], rates[False]), tree.name)
