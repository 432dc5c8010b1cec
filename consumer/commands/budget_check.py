"""`verify`'s budget check: every budget's stored spend against its rows' sums, and every
stored state against the state the budget rules (consumer/billing/budget_rules.py) compute from
the ledger rows (docs/operations.md#budgets).

Judged: every period judged before (against the limits stored with it in budget_periods: a
period keeps the limits it was first judged under), and every budget's current period (against
the budget's limits, when it was not judged yet). A state is stored from its first crossing on:
a missing one was never crossed. Run inside verify's snapshot, so the usage
and the states are the ones one set of committed batches left.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import asyncpg

from consumer.billing.budget_rules import StateKey, judge
from consumer.commands.budgets import read_budgets
from consumer.ledger.rebuild import Difference

# Every judged period (with the limits it is judged under) and every budget's current period,
# with its rows' sums.
_SPENDS = """
WITH periods AS (
  SELECT budget_id, period_start, cost_micros_limit, total_tokens_limit, thresholds
  FROM budget_periods WHERE thresholds IS NOT NULL
  UNION ALL
  SELECT b.id, p.start, NULL, NULL, NULL
  FROM budgets AS b CROSS JOIN LATERAL (SELECT budget_period_start(b.period, now()) AS start) AS p
  WHERE NOT EXISTS (SELECT FROM budget_periods AS j WHERE j.budget_id = b.id
                    AND j.period_start = p.start AND j.thresholds IS NOT NULL)
)
SELECT p.*, s.cost_micros, s.total_tokens
FROM periods AS p JOIN budgets AS b ON b.id = p.budget_id
CROSS JOIN LATERAL (
  SELECT coalesce(sum(u.cost_micros), 0) AS cost_micros,
         coalesce(sum(u.total_tokens), 0) AS total_tokens
  FROM token_usage AS u
  WHERE u.search_space_id = b.search_space_id
    AND u.source_at >= p.period_start
    AND u.source_at < budget_period_end(b.period, p.period_start)
    AND (b.user_id IS NULL OR u.user_id = b.user_id)
) AS s
"""
# Each stored period spend that differs from its rows' sums (a period without rows: 0). The
# spend is kept by the usage triggers (migrations/versions/0012); this sums it again.
_SPEND_DIFFERENCES = """
WITH summed AS (
  SELECT b.id AS budget_id, budget_period_start(b.period, u.source_at) AS period_start,
         sum(u.cost_micros) AS cost_micros, sum(u.total_tokens) AS total_tokens
  FROM budgets AS b JOIN token_usage AS u ON u.search_space_id = b.search_space_id
  WHERE b.user_id IS NULL
  GROUP BY 1, 2
  UNION ALL
  SELECT b.id, budget_period_start(b.period, u.source_at), sum(u.cost_micros),
         sum(u.total_tokens)
  FROM budgets AS b JOIN token_usage AS u
    ON u.search_space_id = b.search_space_id AND u.user_id = b.user_id
  GROUP BY 1, 2
)
SELECT coalesce(s.budget_id, r.budget_id) AS budget_id,
       coalesce(s.period_start, r.period_start) AS period_start,
       coalesce(s.cost_micros, 0) AS stored_cost_micros,
       coalesce(s.total_tokens, 0) AS stored_total_tokens,
       coalesce(r.cost_micros, 0) AS cost_micros, coalesce(r.total_tokens, 0) AS total_tokens
FROM budget_periods AS s
FULL JOIN summed AS r ON r.budget_id = s.budget_id AND r.period_start = s.period_start
WHERE coalesce(s.cost_micros, 0) <> coalesce(r.cost_micros, 0)
   OR coalesce(s.total_tokens, 0) <> coalesce(r.total_tokens, 0)
ORDER BY 1, 2
"""
_STATES = (
    "SELECT budget_id, period_start, measure, threshold, limit_value, crossed, sequence"
    " FROM budget_states"
)


def _key(budget_id: int, start: datetime, measure: str, threshold: int) -> str:
    return f"budget {budget_id} period {start.astimezone(UTC).date()} {measure} {threshold} %"


async def check_budgets(conn: asyncpg.Connection) -> list[Difference]:
    """Every stored budget spend and state that differs from the ledger's, described."""
    budgets = {budget.id: budget for budget in await read_budgets(conn)}
    found = [
        Difference(
            "budget_periods",
            f"budget {row['budget_id']} period {row['period_start'].astimezone(UTC).date()}",
            f"stored {row['stored_cost_micros']} cost_micros and {row['stored_total_tokens']}"
            f" total_tokens, the ledger's rows sum to {row['cost_micros']} and"
            f" {row['total_tokens']} (`token-ledger budget set` with the budget's own values"
            " sums them again)",
        )
        for row in await conn.fetch(_SPEND_DIFFERENCES)
    ]
    stored: dict[tuple[int, datetime], dict[StateKey, asyncpg.Record]] = {}
    for row in await conn.fetch(_STATES):
        period = (row["budget_id"], row["period_start"])
        stored.setdefault(period, {})[row["measure"], row["threshold"]] = row
    for row in await conn.fetch(_SPENDS):
        budget_id, start = row["budget_id"], row["period_start"]
        states = stored.get((budget_id, start), {})
        budget = budgets[budget_id]
        if row["thresholds"] is not None:  # judged: under the limits stored with it
            budget = replace(
                budget,
                cost_micros_limit=row["cost_micros_limit"],
                total_tokens_limit=row["total_tokens_limit"],
                thresholds=tuple(row["thresholds"]),
            )
        # A stored state the limits no longer have is judged against none: withdrawn.
        limits: dict[StateKey, int | None] = dict.fromkeys(states)
        limits.update(budget.limits())
        expected = judge(
            {"cost_micros": int(row["cost_micros"]), "total_tokens": int(row["total_tokens"])},
            limits,
        )
        for (measure, threshold), want in sorted(expected.items()):
            state = states.get((measure, threshold))
            have = state is not None and state["crossed"]
            where = _key(budget_id, start, measure, threshold)
            if have != want:
                spend = row[measure]
                found.append(
                    Difference(
                        "budget_states",
                        where,
                        f"stored {'crossed' if have else 'not crossed'}, the ledger's spend"
                        f" {spend} of limit {limits[measure, threshold]} is"
                        f" {'crossed' if want else 'not crossed'}",
                    )
                )
            elif state is not None and state["crossed"] != (state["sequence"] % 2 == 1):
                found.append(Difference("budget_states", where, "sequence and state disagree"))
    return found
