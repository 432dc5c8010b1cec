"""Each budget period's spend and limits in one row, kept by the statement that changes its usage.

0010 summed every touched period's usage rows again in each batch: a space's `total` budget
read the space's whole ledger per batch, so a drain's cost grew with the square of its length;
and it wrote six `budget_states` rows for every period the first time it was judged, to keep
the limits the period is judged under (docs/development.md#budgets).

`budget_periods` holds, per (budget, period start):
- the spend: the sums of cost_micros and total_tokens of the usage rows in that budget's scope
  and period. It is derived from the rows in the statement that changes them: the usage
  triggers pass the statement's row changes (its NEW rows added, its OLD rows taken away, from
  the transition tables) to `budget_add`, which adds them up per (budget, period) under the
  budget's row lock. So it moves exactly when the rows move: a redelivery or replay changes no
  row and no sum; a supersession or late correction moves its old amount out and its new one
  in, in one statement. `verify` sums every period from the rows again and reports any
  difference; `token-ledger budget set` sums its budget's periods again (a new budget's
  history; the repair for a difference).
- the limits and thresholds the period is judged under, set the first time it is judged (null
  before), replaced when the budget changes.

`budget_states` now holds a (budget, period, measure, threshold) from its first crossing on: a
missing state is one never crossed (sequence 0). The evaluation is one set-based statement
that reaches every row it reads by an index probe from a touched (budget, period), and writes
only the states that change.

Every statement that changes usage moves the sums: INSERT and UPDATE (their transition tables),
DELETE (its old rows: by hand, or with a thread or message) and TRUNCATE (every period to 0).
Each statement adds its amounts at once; the periods a transaction moved are judged once, at
its COMMIT, on what it leaves (a deferred constraint trigger).

The functions run with `jit = off`: the planner's estimates for them pass jit_above_cost, and
compiling each statement (20-80 ms, measured) cost far more than running it (a few ms).

Upgrading: the migration holds writes to budgets and token_usage while it sums the rows, so
consumers still on 0010 wait for it rather than write usage no sum would hold. `token-ledger
budget set` of an earlier release fails once 0012 is in (the function it calls changed):
upgrade the command with the migration. The consumer and `serve` are not concerned.

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
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Literal SQL: a migration is frozen history and must not follow later code.
# Each touched period: the statement's row changes added to its spend (under the budget's row
# lock); the budget's limits and (distinct) thresholds, the first time it is touched or when the
# budget changed. A budget deleted meanwhile is not seen.
ADD = """
CREATE FUNCTION budget_add(budget_ids bigint[], starts timestamptz[], costs numeric[],
                           tokens numeric[], reconfigure boolean) RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
  -- The touched budgets locked in id order: two members writing one space take turns here.
  PERFORM FROM budgets WHERE id = ANY(budget_ids) ORDER BY id FOR UPDATE;
  INSERT INTO budget_periods AS p (budget_id, period_start, cost_micros, total_tokens,
                                   cost_micros_limit, total_tokens_limit, thresholds)
  SELECT c.budget_id, c.start, c.cost, c.tokens, b.cost_micros_limit, b.total_tokens_limit,
         (SELECT array_agg(DISTINCT th ORDER BY th) FROM unnest(b.thresholds) AS th)
  FROM (
    SELECT c.budget_id, c.start, coalesce(sum(c.cost), 0) AS cost,
           coalesce(sum(c.tokens), 0) AS tokens
    FROM unnest(budget_ids, starts, costs, tokens) AS c(budget_id, start, cost, tokens)
    GROUP BY c.budget_id, c.start
  ) AS c
  JOIN budgets AS b ON b.id = c.budget_id
  ORDER BY c.budget_id, c.start
  ON CONFLICT (budget_id, period_start) DO UPDATE SET
    cost_micros = p.cost_micros + EXCLUDED.cost_micros,
    total_tokens = p.total_tokens + EXCLUDED.total_tokens,
    cost_micros_limit = CASE WHEN reconfigure OR p.thresholds IS NULL
                             THEN EXCLUDED.cost_micros_limit ELSE p.cost_micros_limit END,
    total_tokens_limit = CASE WHEN reconfigure OR p.thresholds IS NULL
                              THEN EXCLUDED.total_tokens_limit ELSE p.total_tokens_limit END,
    thresholds = CASE WHEN reconfigure OR p.thresholds IS NULL
                      THEN EXCLUDED.thresholds ELSE p.thresholds END
  WHERE EXCLUDED.cost_micros <> 0 OR EXCLUDED.total_tokens <> 0 OR reconfigure
     OR p.thresholds IS NULL;
END $$
"""
# The judgement of every touched (measure, threshold), on the spend budget_add kept.
JUDGE = """
CREATE FUNCTION budget_judge(budget_ids bigint[], starts timestamptz[], usage_ids bigint[],
                             revisions integer[]) RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
  -- Every join below is an index probe from a touched (budget, period): the planner cannot
  -- know how many pairs the arrays hold, and a join of two such sets became a nested loop of
  -- one over the other (measured: 1.3 s for 700 pairs).
  WITH touched AS (
    SELECT DISTINCT ON (t.budget_id, t.start) t.*
    FROM unnest(budget_ids, starts, usage_ids, revisions) AS t(budget_id, start, usage_id, revision)
    ORDER BY t.budget_id, t.start, t.usage_id DESC NULLS LAST, t.revision DESC
  ), changed AS (
    SELECT t.budget_id, t.start, t.usage_id, t.revision, b.search_space_id, b.user_id, b.period,
      l.measure, l.threshold, l.limit_value, l.spend, j.crossed,
      st.sequence AS sequence_before,
      coalesce(st.sequence, 0) + (j.crossed <> coalesce(st.crossed, false))::integer AS sequence
    FROM touched AS t
    JOIN budgets AS b ON b.id = t.budget_id
    JOIN budget_periods AS p ON p.budget_id = t.budget_id AND p.period_start = t.start
    -- Each (measure, threshold) the period is judged under, and each stored state it no
    -- longer has (after a change of the budget), judged against no limit: withdrawn.
    CROSS JOIN LATERAL (
      SELECT m.measure, th.threshold, m.limit_value, m.spend
      FROM (VALUES ('cost_micros', p.cost_micros_limit, p.cost_micros),
                   ('total_tokens', p.total_tokens_limit, p.total_tokens))
             AS m(measure, limit_value, spend)
      CROSS JOIN unnest(p.thresholds) AS th(threshold)
      WHERE m.limit_value IS NOT NULL
      UNION ALL
      SELECT s.measure, s.threshold, NULL,
             CASE s.measure WHEN 'cost_micros' THEN p.cost_micros ELSE p.total_tokens END
      FROM budget_states AS s
      WHERE s.budget_id = t.budget_id AND s.period_start = t.start
        AND NOT (s.threshold = ANY(p.thresholds) AND CASE s.measure
              WHEN 'cost_micros' THEN p.cost_micros_limit ELSE p.total_tokens_limit END IS NOT NULL)
    ) AS l
    CROSS JOIN LATERAL (
      SELECT l.limit_value IS NOT NULL AND l.spend * 100 >= l.limit_value::numeric * l.threshold
               AS crossed
    ) AS j
    LEFT JOIN budget_states AS st ON st.budget_id = t.budget_id AND st.period_start = t.start
                                 AND st.measure = l.measure AND st.threshold = l.threshold
    -- Only the states that change: a state is stored from its first crossing on.
    WHERE CASE WHEN st.budget_id IS NULL THEN j.crossed
               ELSE st.crossed <> j.crossed OR st.limit_value IS DISTINCT FROM l.limit_value END
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
# budget_add, then budget_judge: what `budget set` runs.
EVALUATE = """
CREATE FUNCTION budget_evaluate(budget_ids bigint[], starts timestamptz[], usage_ids bigint[],
                                revisions integer[], costs numeric[], tokens numeric[],
                                reconfigure boolean) RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
  -- One statement that locks and adds, then one that reads: under READ COMMITTED it takes a
  -- new snapshot, so a member that waited for the lock judges what the one before committed.
  PERFORM budget_add(budget_ids, starts, costs, tokens, reconfigure);
  PERFORM budget_judge(budget_ids, starts, usage_ids, revisions);
END $$
"""
# The (budget, period) pairs a statement's usage rows touch, one entry each: the amounts the
# statement adds to it (a created row's; an updated row's new amounts to its new period and its
# old amounts taken from its old one, the same period unless the row moved: another user or
# time, which migrations/versions/0005 gives two revisions, the reversal causing the old
# period's change; a deleted row's taken away) and the latest revision that touched it.
PAIRS = """
  SELECT array_agg(budget_id), array_agg(start), array_agg(usage_id), array_agg(revision),
         array_agg(cost_micros), array_agg(total_tokens)
  INTO ids, starts, usage_ids, revisions, costs, tokens
  FROM (
    SELECT DISTINCT ON (budget_id, start) budget_id, start, usage_id, revision,
           sum(cost_micros) OVER per_period AS cost_micros,
           sum(total_tokens) OVER per_period AS total_tokens
    FROM (
      SELECT b.id AS budget_id, budget_period_start(b.period, c.source_at) AS start,
             c.id AS usage_id, c.revision, c.cost_micros, c.total_tokens
      FROM changed AS c CROSS JOIN LATERAL (
        -- Two probes of the partial unique indexes (an OR of both could use neither).
        SELECT id, period FROM budgets
        WHERE search_space_id = c.search_space_id AND user_id IS NULL
        UNION ALL
        SELECT id, period FROM budgets
        WHERE search_space_id = c.search_space_id AND user_id = c.user_id) AS b
    ) AS touched
    WINDOW per_period AS (PARTITION BY budget_id, start)
    ORDER BY budget_id, start, usage_id DESC, revision DESC
  ) AS p;
"""
DECLARE_PAIRS = """
DECLARE ids bigint[]; starts timestamptz[]; usage_ids bigint[]; revisions integer[];
        costs numeric[]; tokens numeric[];
"""
# Each usage statement adds its amounts at once (its transition tables exist only then), but its
# periods are judged at COMMIT, on what the whole transaction leaves. Judged after each
# statement, a period could be judged on a spend no transaction commits: an INSERT … ON
# CONFLICT DO UPDATE fires its AFTER UPDATE trigger before its AFTER INSERT one, a MERGE its
# DELETE trigger before its INSERT one, and a batch split around a poison record writes its
# usage in several statements (a withdrawal and a second crossing where the state holds, or a
# crossing never reached). So a statement appends its periods to a list local to the
# transaction (a setting, undone with the statement or savepoint that rolls back), and a
# deferred constraint trigger on budget_periods judges the list once.
#
# Before anything, the statement takes its spaces' shared locks, which `budget set` takes
# exclusively: a budget created meanwhile is summed from the rows by whichever commits first and
# moved by the other (the consumer's batches take them already: consumer/ledger/store.py).
PENDING = """
    PERFORM set_config('token_ledger.budgets_pending', (
      SELECT coalesce(nullif(current_setting('token_ledger.budgets_pending', true), '')::jsonb,
                      '[]') || jsonb_agg(jsonb_build_object(
               'budget_id', p.budget_id, 'start', p.start AT TIME ZONE 'UTC',
               'usage_id', p.usage_id, 'revision', p.revision))
      FROM unnest(ids, starts, usage_ids, revisions) AS p(budget_id, start, usage_id, revision)
    )::text, true);
"""


def _usage_trigger(name: str, spaces: str, changed: str) -> str:
    """The statement trigger function `name`: the `spaces` (a query) locked, the amounts of the
    `changed` rows (a CTE's body) added, their periods left to be judged at COMMIT. Listed
    before they are added: under SET CONSTRAINTS … IMMEDIATE the judgement runs at the end of
    budget_add's statement, and must find them."""
    return (
        f"""
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$"""
        + DECLARE_PAIRS
        + f"""BEGIN
  PERFORM pg_advisory_xact_lock_shared(-k.space)
  FROM (SELECT DISTINCT s.search_space_id AS space FROM ({spaces}) AS s ORDER BY 1) AS k;
  IF NOT EXISTS (SELECT FROM budgets) THEN RETURN NULL; END IF;
  WITH changed AS ({changed}
  )"""
        + PAIRS
        + """  IF ids IS NOT NULL THEN"""
        + PENDING
        + """    PERFORM budget_add(ids, starts, costs, tokens, false);
  END IF;
  RETURN NULL;
END $$
"""
    )


USAGE_CREATED = _usage_trigger(
    "budgets_usage_created",
    "SELECT search_space_id FROM new_rows",
    """
    SELECT n.search_space_id, n.user_id, n.source_at, n.id, n.revision,
           n.cost_micros::numeric AS cost_micros, n.total_tokens::numeric AS total_tokens
    FROM new_rows AS n""",
)
# The billed values and the winning claim (its user and time) change only with the revision
# (migrations/versions/0003), so an unrevised row adds and takes nothing.
USAGE_REVISED = _usage_trigger(
    "budgets_usage_revised",
    # The old rows' spaces too: a manual fix may move a row to another space (0005).
    "SELECT search_space_id FROM new_rows UNION ALL SELECT search_space_id FROM old_rows",
    """
    SELECT n.search_space_id, n.user_id, n.source_at, n.id, n.revision,
           n.cost_micros::numeric AS cost_micros, n.total_tokens::numeric AS total_tokens
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE n.revision <> o.revision
    UNION ALL
    SELECT o.search_space_id, o.user_id, o.source_at, o.id,
           CASE WHEN n.revision = o.revision + 2 THEN o.revision + 1 ELSE n.revision END,
           -o.cost_micros::numeric, -o.total_tokens::numeric
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id WHERE n.revision <> o.revision""",
)
# A deleted row (by hand, or with its thread or message) takes its amounts away; the alert names
# its last revision.
USAGE_DELETED = _usage_trigger(
    "budgets_usage_deleted",
    "SELECT search_space_id FROM old_rows",
    """
    SELECT o.search_space_id, o.user_id, o.source_at, o.id, o.revision,
           -o.cost_micros::numeric AS cost_micros, -o.total_tokens::numeric AS total_tokens
    FROM old_rows AS o""",
)
# TRUNCATE has no transition table: every period's spend is 0, every judged period judged.
USAGE_TRUNCATED = (
    """
CREATE FUNCTION budgets_usage_truncated() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$"""
    + DECLARE_PAIRS
    + """BEGIN
  SELECT array_agg(budget_id), array_agg(period_start), array_agg(NULL::bigint),
         array_agg(NULL::integer)
  INTO ids, starts, usage_ids, revisions
  FROM budget_periods WHERE thresholds IS NOT NULL;
  IF ids IS NOT NULL THEN
    PERFORM FROM budgets WHERE id = ANY(ids) ORDER BY id FOR UPDATE;"""
    + PENDING
    + """  END IF;
  UPDATE budget_periods SET cost_micros = 0, total_tokens = 0
  WHERE cost_micros <> 0 OR total_tokens <> 0;
  RETURN NULL;
END $$
"""
)
JUDGE_PENDING = """
CREATE FUNCTION budgets_judge_pending() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
DECLARE pending jsonb;
BEGIN
  -- Once per transaction: the first of its deferred events takes the whole list.
  pending := nullif(current_setting('token_ledger.budgets_pending', true), '')::jsonb;
  IF pending IS NULL THEN RETURN NULL; END IF;
  PERFORM set_config('token_ledger.budgets_pending', '', true);
  PERFORM budget_judge(array_agg(p.budget_id), array_agg(p.start AT TIME ZONE 'UTC'),
                       array_agg(p.usage_id), array_agg(p.revision))
  FROM jsonb_to_recordset(pending)
    AS p(budget_id bigint, start timestamp, usage_id bigint, revision integer);
  RETURN NULL;
END $$
"""
TRIGGERS = (
    "CREATE TRIGGER budgets_usage_deleted AFTER DELETE ON token_usage"
    " REFERENCING OLD TABLE AS old_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION budgets_usage_deleted()",
    "CREATE TRIGGER budgets_usage_truncated AFTER TRUNCATE ON token_usage"
    " FOR EACH STATEMENT EXECUTE FUNCTION budgets_usage_truncated()",
    # Every period a statement moves has its row changed: its events fire at COMMIT.
    "CREATE CONSTRAINT TRIGGER budget_periods_judged AFTER INSERT OR UPDATE ON budget_periods"
    " DEFERRABLE INITIALLY DEFERRED"
    " FOR EACH ROW EXECUTE FUNCTION budgets_judge_pending()",
)
# Every existing budget's periods: their rows' sums, and the limits their states were judged
# under (the period's states, written for every (measure, threshold) when it was first judged,
# all carry its limits but those withdrawn by a change of the budget).
BACKFILL = """
INSERT INTO budget_periods (budget_id, period_start, cost_micros, total_tokens,
                            cost_micros_limit, total_tokens_limit, thresholds)
SELECT coalesce(u.budget_id, s.budget_id), coalesce(u.start, s.start),
       coalesce(u.cost_micros, 0), coalesce(u.total_tokens, 0),
       s.cost_micros_limit, s.total_tokens_limit, s.thresholds
FROM (
  SELECT b.id AS budget_id, budget_period_start(b.period, u.source_at) AS start,
         sum(u.cost_micros) AS cost_micros, sum(u.total_tokens) AS total_tokens
  FROM budgets AS b JOIN token_usage AS u ON u.search_space_id = b.search_space_id
    AND (b.user_id IS NULL OR u.user_id = b.user_id)
  GROUP BY 1, 2
) AS u
FULL JOIN (
  SELECT budget_id, period_start AS start,
         max(limit_value) FILTER (WHERE measure = 'cost_micros') AS cost_micros_limit,
         max(limit_value) FILTER (WHERE measure = 'total_tokens') AS total_tokens_limit,
         coalesce(array_agg(DISTINCT threshold ORDER BY threshold)
                    FILTER (WHERE limit_value IS NOT NULL), '{}') AS thresholds
  FROM budget_states GROUP BY 1, 2
) AS s ON s.budget_id = u.budget_id AND s.start = u.start
"""
# A state is stored from its first crossing on.
NEVER_CROSSED = "DELETE FROM budget_states WHERE sequence = 0"
# Back to 0010's form: every (measure, threshold) of a judged period has a state.
UNCROSSED_STATES = """
INSERT INTO budget_states (budget_id, period_start, measure, threshold, limit_value, crossed,
                           sequence, spend)
SELECT p.budget_id, p.period_start, m.measure, th.threshold, m.limit_value, false, 0, m.spend
FROM budget_periods AS p
CROSS JOIN LATERAL (VALUES ('cost_micros', p.cost_micros_limit, p.cost_micros),
                           ('total_tokens', p.total_tokens_limit, p.total_tokens))
  AS m(measure, limit_value, spend)
CROSS JOIN unnest(p.thresholds) AS th(threshold)
WHERE m.limit_value IS NOT NULL
ON CONFLICT (budget_id, period_start, measure, threshold) DO NOTHING
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
        "budget_periods",
        sa.Column("budget_id", sa.BigInteger(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        # numeric, as sum() gives it: a period's spend may pass 2^63 - 1, though no row does.
        sa.Column("cost_micros", sa.Numeric(), nullable=False),
        sa.Column("total_tokens", sa.Numeric(), nullable=False),
        # What the period is judged under; null until it is first judged.
        sa.Column("cost_micros_limit", sa.BigInteger(), nullable=True),
        sa.Column("total_tokens_limit", sa.BigInteger(), nullable=True),
        sa.Column("thresholds", postgresql.ARRAY(sa.SmallInteger()), nullable=True),
        sa.PrimaryKeyConstraint("budget_id", "period_start", name=op.f("pk_budget_periods")),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["budgets.id"],
            name=op.f("fk_budget_periods_budget_id_budgets"),
            ondelete="CASCADE",
        ),
    )
    # Batches of consumers still on 0010 commit before the sums are read, and none starts
    # until the new triggers are in: a batch between the two would be in no sum. The budgets
    # first, as a batch takes them (consumer/ledger/store.py: its budget rows, then its usage):
    # the other order deadlocks with a batch that holds its budget rows and waits for usage.
    op.execute("LOCK TABLE budgets IN EXCLUSIVE MODE")
    op.execute("LOCK TABLE token_usage, budget_states IN SHARE MODE")
    op.execute(BACKFILL)
    op.execute(NEVER_CROSSED)
    op.execute(f"DROP FUNCTION {OLD_EVALUATE}")
    op.execute("DROP FUNCTION budget_limits(bigint, timestamptz, boolean)")
    for statement in (
        ADD,
        JUDGE,
        EVALUATE,
        USAGE_CREATED,
        USAGE_REVISED,
        USAGE_DELETED,
        USAGE_TRUNCATED,
        JUDGE_PENDING,
        *TRIGGERS,
    ):
        op.execute(statement)


def downgrade() -> None:
    before = _revision_0010()
    op.execute("DROP TRIGGER budget_periods_judged ON budget_periods")
    for trigger in ("budgets_usage_truncated", "budgets_usage_deleted"):
        op.execute(f"DROP TRIGGER {trigger} ON token_usage")
    for function in (
        "budgets_judge_pending()",
        "budgets_usage_truncated()",
        "budgets_usage_deleted()",
        NEW_EVALUATE,
        "budget_judge(bigint[], timestamptz[], bigint[], integer[])",
        "budget_add(bigint[], timestamptz[], numeric[], numeric[], boolean)",
    ):
        op.execute(f"DROP FUNCTION {function}")
    for statement in (before.LIMITS, before.EVALUATE):
        op.execute(statement)
    for statement in (before.USAGE_CREATED, before.USAGE_REVISED):
        op.execute(statement.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    op.execute(UNCROSSED_STATES)
    op.drop_table("budget_periods")
