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
  -- Every join below is an index probe from a touched (budget, period): the planner cannot know
  -- how many pairs the arrays hold, and a join of two of these sets would be a nested loop of
  -- one over the other (measured: 1.3 s for 700 pairs).
  WITH touched AS (
    SELECT DISTINCT ON (t.budget_id, t.start) t.*
    FROM unnest(budget_ids, starts, usage_ids, revisions) AS t(budget_id, start, usage_id, revision)
    ORDER BY t.budget_id, t.start, t.usage_id DESC NULLS LAST, t.revision DESC
  ), changed AS (
    SELECT t.budget_id, t.start, t.usage_id, t.revision, b.search_space_id, b.user_id, b.period,
      l.measure, l.threshold, l.limit_value, v.spend, j.crossed, st.sequence AS sequence_before,
      CASE WHEN st.sequence IS NULL THEN j.crossed::integer
           ELSE st.sequence + (j.crossed <> st.crossed)::integer END AS sequence
    FROM touched AS t
    JOIN budgets AS b ON b.id = t.budget_id
    LEFT JOIN budget_spend AS sp ON sp.budget_id = t.budget_id AND sp.period_start = t.start
    -- What each (measure, threshold) is judged against: a period keeps the limits it was first
    -- judged under; a change of the budget (`reconfigure`) judges it with the budget's, and a
    -- (measure, threshold) it no longer has against no limit, which withdraws it.
    CROSS JOIN LATERAL (
      SELECT s.measure, s.threshold, s.limit_value FROM budget_states AS s
      WHERE s.budget_id = t.budget_id AND s.period_start = t.start AND NOT reconfigure
      UNION ALL
      SELECT m.measure, th.threshold, m.limit_value
      FROM (VALUES ('cost_micros', b.cost_micros_limit),
                   ('total_tokens', b.total_tokens_limit)) AS m(measure, limit_value)
      -- DISTINCT: a threshold written twice (by hand) is one threshold.
      CROSS JOIN (SELECT DISTINCT unnest(b.thresholds)) AS th(threshold)
      WHERE m.limit_value IS NOT NULL
        AND (reconfigure OR NOT EXISTS (SELECT FROM budget_states AS s
                                        WHERE s.budget_id = t.budget_id AND s.period_start = t.start))
      UNION ALL
      SELECT s.measure, s.threshold, NULL FROM budget_states AS s
      WHERE reconfigure AND s.budget_id = t.budget_id AND s.period_start = t.start
        AND NOT (s.threshold = ANY(b.thresholds) AND CASE s.measure
              WHEN 'cost_micros' THEN b.cost_micros_limit ELSE b.total_tokens_limit END IS NOT NULL)
    ) AS l
    CROSS JOIN LATERAL (
      SELECT CASE l.measure WHEN 'cost_micros' THEN coalesce(sp.cost_micros, 0)
                            ELSE coalesce(sp.total_tokens, 0) END AS spend
    ) AS v
    CROSS JOIN LATERAL (
      SELECT l.limit_value IS NOT NULL AND v.spend * 100 >= l.limit_value::numeric * l.threshold
               AS crossed
    ) AS j
    LEFT JOIN budget_states AS st ON st.budget_id = t.budget_id AND st.period_start = t.start
                                 AND st.measure = l.measure AND st.threshold = l.threshold
    -- Only the states that are new or change: the rest stay as they are.
    WHERE st.budget_id IS NULL OR st.crossed <> j.crossed
       OR st.limit_value IS DISTINCT FROM l.limit_value
  ), written AS (
    -- Under the budget's lock nothing else writes its states, so `changed` knows each new
    -- sequence.
    INSERT INTO budget_states AS s (budget_id, period_start, measure, threshold, limit_value,
                                    crossed, sequence, spend, updated_at)
    SELECT c.budget_id, c.start, c.measure, c.threshold, c.limit_value, c.crossed, c.sequence,
           c.spend, now()
    FROM changed AS c ORDER BY 1, 2, 3, 4
    ON CONFLICT (budget_id, period_start, measure, threshold) DO UPDATE SET
      crossed = EXCLUDED.crossed,
      sequence = EXCLUDED.sequence,
      spend = CASE WHEN EXCLUDED.crossed <> s.crossed THEN EXCLUDED.spend ELSE s.spend END,
      limit_value = EXCLUDED.limit_value,
      updated_at = now()
  )
  INSERT INTO budget_alert_outbox (budget_id, search_space_id, user_id, period, period_start,
    measure, threshold, sequence, crossed, spend, limit_value, usage_id, usage_revision)
  SELECT c.budget_id, c.search_space_id, c.user_id, c.period, c.start, c.measure, c.threshold,
    c.sequence, c.crossed, c.spend, c.limit_value, c.usage_id, c.revision
  FROM changed AS c
  WHERE c.sequence <> coalesce(c.sequence_before, 0)
  ORDER BY c.budget_id, c.start, c.measure, c.threshold;
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
