"""Budgets and their spend alerts (docs/contract.md#budgets-and-spend-alerts).

- `budgets`: one per scope (a search space, or one user of it) and period (UTC `day`, `month`
  or `total`), with limits on cost_micros and/or total_tokens and thresholds in percent.
- `budget_states`: per (budget, period start, measure, threshold) whether the period's spend
  has crossed the threshold, the sequence number of that state (0 never crossed; odd crossed,
  even withdrawn), the limit it is judged against and the spend when it last changed. Written
  for every configured (measure, threshold) the first time a period is judged, so a period
  keeps the limits it was judged under: a later limit applies from the current period on.
- `budget_alert_outbox`: one row per change of state, in the transaction that changed it; the
  relay (consumer/billing/relay.py) publishes them like usage revisions.

Spend is never counted up: statement triggers on token_usage (beside the billing outbox's,
with the same transition tables) collect the (budget, period) pairs the statement's OLD and NEW
rows touch, and `budget_evaluate` locks those budget rows in id order (two members writing one
space take turns there), sums each touched period's usage with one probe of
ix_token_usage_search_space_id_source_at, and compares each threshold with its stored state. So
redelivery and replay (no usage change, no trigger row), supersession and late corrections (the
period is summed again) are right by construction. `token-ledger budget set` runs the same
function for the budget's current period, with the new limits. consumer/billing/budget_rules.py
holds the same rules in Python, for verify and the tests.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Literal SQL: a migration is frozen history and must not follow later code.
# The start of the UTC calendar period holding `at`; `total` starts at the earliest instant an
# event may carry (year 1).
PERIOD_START = """
CREATE FUNCTION budget_period_start(period text, at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE period
    WHEN 'day' THEN date_trunc('day', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    WHEN 'month' THEN date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    ELSE timestamptz '0001-01-01 00:00:00+00' END
$$
"""
# Calendar arithmetic in UTC, whatever the session's TimeZone.
PERIOD_END = """
CREATE FUNCTION budget_period_end(period text, start timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE period
    WHEN 'day' THEN ((start AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC'
    WHEN 'month' THEN ((start AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
    ELSE timestamptz 'infinity' END
$$
"""
# What each (measure, threshold) of a period is judged against: the limits stored when the
# period was first judged; the budget's own for a period never judged, or when the budget
# changed (`reconfigure`: a (measure, threshold) it no longer has is judged against no limit,
# which withdraws it).
LIMITS = """
CREATE FUNCTION budget_limits(budget bigint, start timestamptz, reconfigure boolean)
RETURNS TABLE (measure text, threshold smallint, limit_value bigint)
LANGUAGE sql STABLE AS $$
  WITH configured AS (
    SELECT m.measure, t.threshold, m.limit_value
    FROM budgets AS b
    CROSS JOIN LATERAL (VALUES ('cost_micros', b.cost_micros_limit),
                               ('total_tokens', b.total_tokens_limit)) AS m(measure, limit_value)
    -- DISTINCT: a threshold written twice (by hand) is one threshold.
    CROSS JOIN LATERAL (SELECT DISTINCT unnest(b.thresholds)) AS t(threshold)
    WHERE b.id = budget AND m.limit_value IS NOT NULL
  ), stored AS (
    SELECT s.measure, s.threshold, s.limit_value FROM budget_states AS s
    WHERE s.budget_id = budget AND s.period_start = start
  )
  SELECT * FROM stored WHERE NOT reconfigure
  UNION ALL
  SELECT * FROM configured WHERE reconfigure OR NOT EXISTS (SELECT FROM stored)
  UNION ALL
  SELECT s.measure, s.threshold, NULL FROM stored AS s
  WHERE reconfigure AND NOT EXISTS (
    SELECT FROM configured AS c WHERE c.measure = s.measure AND c.threshold = s.threshold)
$$
"""
EVALUATE = """
CREATE FUNCTION budget_evaluate(budget_ids bigint[], starts timestamptz[], usage_ids bigint[],
                                revisions integer[], reconfigure boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  -- One statement that locks, then one that reads: under READ COMMITTED the second takes a new
  -- snapshot, so a member that waited here sums what the member before it committed.
  PERFORM FROM budgets WHERE id = ANY(budget_ids) ORDER BY id FOR UPDATE;
  WITH touched AS (
    SELECT DISTINCT ON (t.budget_id, t.start) t.*
    FROM unnest(budget_ids, starts, usage_ids, revisions) AS t(budget_id, start, usage_id, revision)
    ORDER BY t.budget_id, t.start, t.usage_id DESC NULLS LAST, t.revision DESC
  ), spent AS (
    SELECT t.*, b.search_space_id, b.user_id, b.period, s.cost_micros, s.total_tokens
    FROM touched AS t JOIN budgets AS b ON b.id = t.budget_id
    CROSS JOIN LATERAL (
      -- numeric, as sum() gives it: a period's spend may pass 2^63 - 1, though no row does.
      SELECT coalesce(sum(u.cost_micros), 0) AS cost_micros,
             coalesce(sum(u.total_tokens), 0) AS total_tokens
      FROM token_usage AS u
      WHERE u.search_space_id = b.search_space_id
        AND u.source_at >= t.start AND u.source_at < budget_period_end(b.period, t.start)
        AND (b.user_id IS NULL OR u.user_id = b.user_id)
    ) AS s
  ), judged AS (
    SELECT sp.*, l.measure, l.threshold, l.limit_value, j.spend,
      (l.limit_value IS NOT NULL AND j.spend::numeric * 100 >= l.limit_value::numeric * l.threshold)
        AS crossed
    FROM spent AS sp
    CROSS JOIN LATERAL budget_limits(sp.budget_id, sp.start, reconfigure) AS l
    CROSS JOIN LATERAL (SELECT CASE l.measure WHEN 'cost_micros' THEN sp.cost_micros
                                              ELSE sp.total_tokens END AS spend) AS j
  ), before AS (
    SELECT s.budget_id, s.period_start, s.measure, s.threshold, s.sequence
    FROM budget_states AS s JOIN touched AS t ON t.budget_id = s.budget_id AND t.start = s.period_start
  ), written AS (
    INSERT INTO budget_states AS s (budget_id, period_start, measure, threshold, limit_value,
                                    crossed, sequence, spend, updated_at)
    SELECT j.budget_id, j.start, j.measure, j.threshold, j.limit_value, j.crossed,
           j.crossed::integer, j.spend, now()
    FROM judged AS j ORDER BY 1, 2, 3, 4
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
  SELECT j.budget_id, j.search_space_id, j.user_id, j.period, j.start, j.measure, j.threshold,
    w.sequence, j.crossed, j.spend, j.limit_value, j.usage_id, j.revision
  FROM written AS w
  JOIN judged AS j ON (j.budget_id, j.start, j.measure, j.threshold)
                    = (w.budget_id, w.period_start, w.measure, w.threshold)
  LEFT JOIN before AS b ON (b.budget_id, b.period_start, b.measure, b.threshold)
                         = (w.budget_id, w.period_start, w.measure, w.threshold)
  WHERE w.sequence <> coalesce(b.sequence, 0)
  ORDER BY w.budget_id, w.period_start, w.measure, w.threshold;
END $$
"""
# The (budget, period) pairs a statement's usage rows touch, with the revision that touched
# them: a created row's period; an updated row's new period and, when the row moved (another
# user, space or time: migrations/versions/0005 gives it two revisions), its old one, caused by
# the reversal. Nothing at all while no budget exists.
USAGE_CREATED = """
CREATE FUNCTION budgets_usage_created() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE ids bigint[]; starts timestamptz[]; usage_ids bigint[]; revisions integer[];
BEGIN
  IF NOT EXISTS (SELECT FROM budgets) THEN RETURN NULL; END IF;
  SELECT array_agg(b.id), array_agg(budget_period_start(b.period, n.source_at)),
         array_agg(n.id), array_agg(n.revision)
  INTO ids, starts, usage_ids, revisions
  FROM new_rows AS n CROSS JOIN LATERAL (
    -- Two probes of the partial unique indexes (an OR of both could use neither).
    SELECT id, period FROM budgets WHERE search_space_id = n.search_space_id AND user_id IS NULL
    UNION ALL
    SELECT id, period FROM budgets WHERE search_space_id = n.search_space_id
      AND user_id = n.user_id) AS b;
  IF ids IS NOT NULL THEN
    PERFORM budget_evaluate(ids, starts, usage_ids, revisions, false);
  END IF;
  RETURN NULL;
END $$
"""
USAGE_REVISED = """
CREATE FUNCTION budgets_usage_revised() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE ids bigint[]; starts timestamptz[]; usage_ids bigint[]; revisions integer[];
BEGIN
  IF NOT EXISTS (SELECT FROM budgets) THEN RETURN NULL; END IF;
  WITH changed AS (
    SELECT n.search_space_id, n.user_id, n.source_at, n.id, n.revision
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE n.revision <> o.revision
    UNION ALL
    SELECT o.search_space_id, o.user_id, o.source_at, o.id,
           CASE WHEN n.revision = o.revision + 2 THEN o.revision + 1 ELSE n.revision END
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE n.revision <> o.revision
  )
  SELECT array_agg(b.id), array_agg(budget_period_start(b.period, c.source_at)),
         array_agg(c.id), array_agg(c.revision)
  INTO ids, starts, usage_ids, revisions
  FROM changed AS c CROSS JOIN LATERAL (
    SELECT id, period FROM budgets WHERE search_space_id = c.search_space_id AND user_id IS NULL
    UNION ALL
    SELECT id, period FROM budgets WHERE search_space_id = c.search_space_id
      AND user_id = c.user_id) AS b;
  IF ids IS NOT NULL THEN
    PERFORM budget_evaluate(ids, starts, usage_ids, revisions, false);
  END IF;
  RETURN NULL;
END $$
"""
FUNCTIONS = (
    "budgets_usage_revised()",
    "budgets_usage_created()",
    "budget_evaluate(bigint[], timestamptz[], bigint[], integer[], boolean)",
    "budget_limits(bigint, timestamptz, boolean)",
    "budget_period_end(text, timestamptz)",
    "budget_period_start(text, timestamptz)",
)


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "budgets",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("search_space_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("cost_micros_limit", sa.BigInteger(), nullable=True),
        sa.Column("total_tokens_limit", sa.BigInteger(), nullable=True),
        sa.Column(
            "thresholds",
            postgresql.ARRAY(sa.SmallInteger()),
            nullable=False,
            server_default=sa.text("'{50,80,100}'"),
        ),
        sa.Column("created_at", timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", timestamp, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budgets")),
        sa.CheckConstraint("period IN ('day', 'month', 'total')", name=op.f("ck_budgets_period")),
        sa.CheckConstraint(
            "cost_micros_limit IS NOT NULL OR total_tokens_limit IS NOT NULL",
            name=op.f("ck_budgets_a_limit"),
        ),
        sa.CheckConstraint(
            "cost_micros_limit > 0 AND total_tokens_limit > 0", name=op.f("ck_budgets_limits")
        ),
        sa.CheckConstraint(
            "cardinality(thresholds) BETWEEN 1 AND 20 AND 1 <= ALL(thresholds)"
            " AND 1000 >= ALL(thresholds) AND array_position(thresholds, NULL) IS NULL",
            name=op.f("ck_budgets_thresholds"),
        ),
    )
    # One budget per scope and period: a space's own, and one per user of it.
    op.create_index(
        "uq_budgets_search_space_id_period",
        "budgets",
        ["search_space_id", "period"],
        unique=True,
        postgresql_where=sa.text("user_id IS NULL"),
    )
    op.create_index(
        "uq_budgets_search_space_id_user_id_period",
        "budgets",
        ["search_space_id", "user_id", "period"],
        unique=True,
        postgresql_where=sa.text("user_id IS NOT NULL"),
    )
    op.create_table(
        "budget_states",
        sa.Column("budget_id", sa.BigInteger(), nullable=False),
        sa.Column("period_start", timestamp, nullable=False),
        sa.Column("measure", sa.Text(), nullable=False),
        sa.Column("threshold", sa.SmallInteger(), nullable=False),
        sa.Column("limit_value", sa.BigInteger(), nullable=True),
        sa.Column("crossed", sa.Boolean(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("spend", sa.Numeric(), nullable=False),
        sa.Column("updated_at", timestamp, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint(
            "budget_id", "period_start", "measure", "threshold", name=op.f("pk_budget_states")
        ),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["budgets.id"],
            name=op.f("fk_budget_states_budget_id_budgets"),
            ondelete="CASCADE",
        ),
        # Odd sequences are crossings, even ones withdrawals (0: never crossed).
        sa.CheckConstraint("crossed = (sequence % 2 = 1)", name=op.f("ck_budget_states_parity")),
    )
    op.create_table(
        "budget_alert_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("budget_id", sa.BigInteger(), nullable=False),
        sa.Column("search_space_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("period_start", timestamp, nullable=False),
        sa.Column("measure", sa.Text(), nullable=False),
        sa.Column("threshold", sa.SmallInteger(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("crossed", sa.Boolean(), nullable=False),
        sa.Column("spend", sa.Numeric(), nullable=False),
        sa.Column("limit_value", sa.BigInteger(), nullable=True),
        # The usage revision that caused it (null: a change of the budget).
        sa.Column("usage_id", sa.BigInteger(), nullable=True),
        sa.Column("usage_revision", sa.Integer(), nullable=True),
        sa.Column("created_at", timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("published_at", timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_alert_outbox")),
        # No second record for one change of state, whatever wrote it.
        sa.UniqueConstraint(
            "budget_id",
            "period_start",
            "measure",
            "threshold",
            "sequence",
            name="uq_budget_alert_outbox_state_sequence",
        ),
    )
    op.create_index(
        "ix_budget_alert_outbox_pending",
        "budget_alert_outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        "ix_budget_alert_outbox_published_at",
        "budget_alert_outbox",
        ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    for statement in (
        PERIOD_START,
        PERIOD_END,
        LIMITS,
        EVALUATE,
        USAGE_CREATED,
        "CREATE TRIGGER budgets_usage_created AFTER INSERT ON token_usage"
        " REFERENCING NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION budgets_usage_created()",
        USAGE_REVISED,
        "CREATE TRIGGER budgets_usage_revised AFTER UPDATE ON token_usage"
        " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION budgets_usage_revised()",
    ):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER budgets_usage_revised ON token_usage")
    op.execute("DROP TRIGGER budgets_usage_created ON token_usage")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    op.drop_table("budget_alert_outbox")
    op.drop_table("budget_states")
    op.drop_table("budgets")
