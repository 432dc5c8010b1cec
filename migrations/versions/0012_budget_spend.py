"""Each budget period's spend, kept by the statement that changes its usage rows.

0010 summed every touched period's usage rows again in each batch: a space's `total` budget
read the space's whole ledger per batch, so a drain's cost grew with the square of its length
(docs/development.md#budgets). Here `budget_spend` holds, per (budget, period start), the sum of
the cost_micros and total_tokens of the usage rows in that budget's scope and period. It is
derived from the rows, in the statement that changes them: the usage triggers pass each
statement's row changes (its NEW rows added, its OLD rows taken away, from the transition
tables) to `budget_evaluate`, which adds them up per (budget, period) under the budget's row
lock and then judges the thresholds on the sums. So it moves exactly when the rows move:
a redelivery or replay changes no row and no sum, and a supersession or late correction moves
its old amount out and its new one in, in one statement. `verify` sums every period from the
rows again and reports any difference; `token-ledger budget set` sums its budget's periods
from the rows again (a new budget's history; the repair for a difference).

The evaluation is set-based too: one statement finds the limits of every touched (budget,
period) (0010 called `budget_limits` per pair) and writes only the states that change.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 07:00:00
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Literal SQL: a migration is frozen history and must not follow later code.
# `SET jit = off` on each function: the planner's estimates for these statements pass
# jit_above_cost, and compiling them (20-80 ms a statement, measured) cost far more than running
# them (a few ms): JIT is for long analytical queries, not a trigger in every batch.
EVALUATE = """
CREATE FUNCTION budget_evaluate(budget_ids bigint[], starts timestamptz[], usage_ids bigint[],
                                revisions integer[], costs numeric[], tokens numeric[],
                                reconfigure boolean) RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
  -- One statement that locks, then statements that read: under READ COMMITTED each takes a
  -- new snapshot, so a member that waited here sees what the member before it committed.
  PERFORM FROM budgets WHERE id = ANY(budget_ids) ORDER BY id FOR UPDATE;
  -- The statement's row changes, per (budget, period); a budget deleted meanwhile is not seen.
  INSERT INTO budget_spend AS s (budget_id, period_start, cost_micros, total_tokens)
  SELECT c.budget_id, c.start, sum(c.cost), sum(c.tokens)
  FROM unnest(budget_ids, starts, costs, tokens) AS c(budget_id, start, cost, tokens)
  WHERE c.cost IS NOT NULL AND EXISTS (SELECT FROM budgets AS b WHERE b.id = c.budget_id)
  GROUP BY c.budget_id, c.start
  HAVING sum(c.cost) <> 0 OR sum(c.tokens) <> 0
  ORDER BY c.budget_id, c.start
  ON CONFLICT (budget_id, period_start) DO UPDATE SET
    cost_micros = s.cost_micros + EXCLUDED.cost_micros,
    total_tokens = s.total_tokens + EXCLUDED.total_tokens;
  WITH touched AS (
    SELECT DISTINCT ON (t.budget_id, t.start) t.*
    FROM unnest(budget_ids, starts, usage_ids, revisions) AS t(budget_id, start, usage_id, revision)
    ORDER BY t.budget_id, t.start, t.usage_id DESC NULLS LAST, t.revision DESC
  ), spent AS (
    SELECT t.*, b.search_space_id, b.user_id, b.period, b.cost_micros_limit,
           b.total_tokens_limit, b.thresholds,
           coalesce(s.cost_micros, 0) AS cost_micros, coalesce(s.total_tokens, 0) AS total_tokens
    FROM touched AS t JOIN budgets AS b ON b.id = t.budget_id
    LEFT JOIN budget_spend AS s ON s.budget_id = t.budget_id AND s.period_start = t.start
  ), stored AS (
    SELECT s.budget_id, s.period_start AS start, s.measure, s.threshold, s.limit_value,
           s.crossed, s.sequence
    FROM budget_states AS s JOIN touched AS t ON t.budget_id = s.budget_id AND t.start = s.period_start
  ), configured AS (
    SELECT sp.budget_id, sp.start, m.measure, th.threshold, m.limit_value
    FROM spent AS sp
    CROSS JOIN LATERAL (VALUES ('cost_micros', sp.cost_micros_limit),
                               ('total_tokens', sp.total_tokens_limit)) AS m(measure, limit_value)
    -- DISTINCT: a threshold written twice (by hand) is one threshold.
    CROSS JOIN LATERAL (SELECT DISTINCT unnest(sp.thresholds)) AS th(threshold)
    WHERE m.limit_value IS NOT NULL
  ), limits AS (
    -- A period keeps the limits it was first judged under; a change of the budget
    -- (`reconfigure`) judges it with the budget's, and a (measure, threshold) it no longer has
    -- against no limit, which withdraws it.
    SELECT s.budget_id, s.start, s.measure, s.threshold, s.limit_value FROM stored AS s
    WHERE NOT reconfigure
    UNION ALL
    SELECT c.* FROM configured AS c
    WHERE reconfigure
       OR NOT EXISTS (SELECT FROM stored AS s WHERE s.budget_id = c.budget_id AND s.start = c.start)
    UNION ALL
    SELECT s.budget_id, s.start, s.measure, s.threshold, NULL FROM stored AS s
    WHERE reconfigure AND NOT EXISTS (
      SELECT FROM configured AS c WHERE c.budget_id = s.budget_id AND c.start = s.start
        AND c.measure = s.measure AND c.threshold = s.threshold)
  ), judged AS (
    SELECT sp.budget_id, sp.start, sp.usage_id, sp.revision, sp.search_space_id, sp.user_id,
      sp.period, l.measure, l.threshold, l.limit_value, j.spend,
      (l.limit_value IS NOT NULL AND j.spend * 100 >= l.limit_value::numeric * l.threshold)
        AS crossed
    FROM spent AS sp JOIN limits AS l ON l.budget_id = sp.budget_id AND l.start = sp.start
    CROSS JOIN LATERAL (SELECT CASE l.measure WHEN 'cost_micros' THEN sp.cost_micros
                                              ELSE sp.total_tokens END AS spend) AS j
  ), changed AS (
    -- Only the states that are new or change: the rest stay as they are.
    SELECT j.*, s.sequence AS sequence_before
    FROM judged AS j LEFT JOIN stored AS s
      ON s.budget_id = j.budget_id AND s.start = j.start AND s.measure = j.measure
     AND s.threshold = j.threshold
    WHERE s.budget_id IS NULL OR s.crossed <> j.crossed
       OR s.limit_value IS DISTINCT FROM j.limit_value
  ), written AS (
    INSERT INTO budget_states AS s (budget_id, period_start, measure, threshold, limit_value,
                                    crossed, sequence, spend, updated_at)
    SELECT c.budget_id, c.start, c.measure, c.threshold, c.limit_value, c.crossed,
           c.crossed::integer, c.spend, now()
    FROM changed AS c ORDER BY 1, 2, 3, 4
    ON CONFLICT (budget_id, period_start, measure, threshold) DO UPDATE SET
      crossed = EXCLUDED.crossed,
      sequence = s.sequence + (EXCLUDED.crossed <> s.crossed)::integer,
      spend = CASE WHEN EXCLUDED.crossed <> s.crossed THEN EXCLUDED.spend ELSE s.spend END,
      limit_value = EXCLUDED.limit_value,
      updated_at = now()
    WHERE EXCLUDED.crossed <> s.crossed OR EXCLUDED.limit_value IS DISTINCT FROM s.limit_value
    RETURNING s.budget_id, s.period_start, s.measure, s.threshold, s.sequence
  )
  INSERT INTO budget_alert_outbox (budget_id, search_space_id, user_id, period, period_start,
    measure, threshold, sequence, crossed, spend, limit_value, usage_id, usage_revision)
  SELECT c.budget_id, c.search_space_id, c.user_id, c.period, c.start, c.measure, c.threshold,
    w.sequence, c.crossed, c.spend, c.limit_value, c.usage_id, c.revision
  FROM written AS w
  JOIN changed AS c ON c.budget_id = w.budget_id AND c.start = w.period_start
                   AND c.measure = w.measure AND c.threshold = w.threshold
  WHERE w.sequence <> coalesce(c.sequence_before, 0)
  ORDER BY w.budget_id, w.period_start, w.measure, w.threshold;
END $$
"""
# The (budget, period) pairs a statement's usage rows touch, with the revision that touched
# them and the amounts they add: a created row's; an updated row's new amounts to its new
# period and its old amounts taken from its old one (the same period unless the row moved:
# another user or time, which migrations/versions/0005 gives two revisions, the reversal
# causing the old period's change). Nothing at all while no budget exists.
USAGE_CREATED = """
CREATE OR REPLACE FUNCTION budgets_usage_created() RETURNS trigger LANGUAGE plpgsql
SET jit = off AS $$
DECLARE ids bigint[]; starts timestamptz[]; usage_ids bigint[]; revisions integer[];
        costs numeric[]; tokens numeric[];
BEGIN
  IF NOT EXISTS (SELECT FROM budgets) THEN RETURN NULL; END IF;
  SELECT array_agg(b.id), array_agg(budget_period_start(b.period, n.source_at)),
         array_agg(n.id), array_agg(n.revision), array_agg(n.cost_micros::numeric),
         array_agg(n.total_tokens::numeric)
  INTO ids, starts, usage_ids, revisions, costs, tokens
  FROM new_rows AS n CROSS JOIN LATERAL (
    -- Two probes of the partial unique indexes (an OR of both could use neither).
    SELECT id, period FROM budgets WHERE search_space_id = n.search_space_id AND user_id IS NULL
    UNION ALL
    SELECT id, period FROM budgets WHERE search_space_id = n.search_space_id
      AND user_id = n.user_id) AS b;
  IF ids IS NOT NULL THEN
    PERFORM budget_evaluate(ids, starts, usage_ids, revisions, costs, tokens, false);
  END IF;
  RETURN NULL;
END $$
"""
USAGE_REVISED = """
CREATE OR REPLACE FUNCTION budgets_usage_revised() RETURNS trigger LANGUAGE plpgsql
SET jit = off AS $$
DECLARE ids bigint[]; starts timestamptz[]; usage_ids bigint[]; revisions integer[];
        costs numeric[]; tokens numeric[];
BEGIN
  IF NOT EXISTS (SELECT FROM budgets) THEN RETURN NULL; END IF;
  -- The billed values and the winning claim (its user and time) change only with the
  -- revision (migrations/versions/0003), so an unrevised row adds and takes nothing.
  WITH changed AS (
    SELECT n.search_space_id, n.user_id, n.source_at, n.id, n.revision,
           n.cost_micros::numeric AS cost, n.total_tokens::numeric AS tokens
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE n.revision <> o.revision
    UNION ALL
    SELECT o.search_space_id, o.user_id, o.source_at, o.id,
           CASE WHEN n.revision = o.revision + 2 THEN o.revision + 1 ELSE n.revision END,
           -o.cost_micros::numeric, -o.total_tokens::numeric
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE n.revision <> o.revision
  )
  SELECT array_agg(b.id), array_agg(budget_period_start(b.period, c.source_at)),
         array_agg(c.id), array_agg(c.revision), array_agg(c.cost), array_agg(c.tokens)
  INTO ids, starts, usage_ids, revisions, costs, tokens
  FROM changed AS c CROSS JOIN LATERAL (
    SELECT id, period FROM budgets WHERE search_space_id = c.search_space_id AND user_id IS NULL
    UNION ALL
    SELECT id, period FROM budgets WHERE search_space_id = c.search_space_id
      AND user_id = c.user_id) AS b;
  IF ids IS NOT NULL THEN
    PERFORM budget_evaluate(ids, starts, usage_ids, revisions, costs, tokens, false);
  END IF;
  RETURN NULL;
END $$
"""
# Every existing budget's periods, summed from the rows.
BACKFILL = """
INSERT INTO budget_spend (budget_id, period_start, cost_micros, total_tokens)
SELECT b.id, budget_period_start(b.period, u.source_at), sum(u.cost_micros), sum(u.total_tokens)
FROM budgets AS b JOIN token_usage AS u ON u.search_space_id = b.search_space_id
  AND (b.user_id IS NULL OR u.user_id = b.user_id)
GROUP BY 1, 2
"""
OLD_EVALUATE = "budget_evaluate(bigint[], timestamptz[], bigint[], integer[], boolean)"
NEW_EVALUATE = (
    "budget_evaluate(bigint[], timestamptz[], bigint[], integer[], numeric[], numeric[], boolean)"
)


def _revision_0010() -> ModuleType:
    """0010's module, whose frozen statements the downgrade restores."""
    spec = importlib.util.spec_from_file_location(
        "token_ledger_migration_0010", Path(__file__).with_name("0010_budgets.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.create_table(
        "budget_spend",
        sa.Column("budget_id", sa.BigInteger(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        # numeric, as sum() gives it: a period's spend may pass 2^63 - 1, though no row does.
        sa.Column("cost_micros", sa.Numeric(), nullable=False),
        sa.Column("total_tokens", sa.Numeric(), nullable=False),
        sa.PrimaryKeyConstraint("budget_id", "period_start", name=op.f("pk_budget_spend")),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["budgets.id"],
            name=op.f("fk_budget_spend_budget_id_budgets"),
            ondelete="CASCADE",
        ),
    )
    op.execute(BACKFILL)
    op.execute(f"DROP FUNCTION {OLD_EVALUATE}")
    op.execute("DROP FUNCTION budget_limits(bigint, timestamptz, boolean)")
    for statement in (EVALUATE, USAGE_CREATED, USAGE_REVISED):
        op.execute(statement)


def downgrade() -> None:
    before = _revision_0010()
    op.execute(f"DROP FUNCTION {NEW_EVALUATE}")
    for statement in (before.LIMITS, before.EVALUATE):
        op.execute(statement)
    for statement in (before.USAGE_CREATED, before.USAGE_REVISED):
        op.execute(statement.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    op.drop_table("budget_spend")
