"""Billing attribution: a revision that moves a usage row to another user, tenant or time first
reverses what the previous revision billed, under the previous attribution.

A revision is billed to (search_space_id, user_id, occurred_at of the winning event). When a
new winning claim changes any of the three, summing deltas per (tenant, user, day) would move
the difference only, and credit it to the wrong user and day. Such an update now writes two
outbox rows (docs/contract.md#billing-attribution):
- revision n+1, `reverses` = n: the previous attribution, every measure 0 and delta = minus
  what it billed (its breakdown empty);
- revision n+2: the new attribution and values, delta = the whole new usage.
An update that keeps the attribution writes one row with delta = new - previous, as before.
Rows already in the outbox are left as they are.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Literal SQL: a migration is frozen history and must not follow later code.
ATTRIBUTION_MOVES = """(NEW.user_id IS DISTINCT FROM OLD.user_id
    OR NEW.search_space_id IS DISTINCT FROM OLD.search_space_id
    OR NEW.source_at IS DISTINCT FROM OLD.source_at)"""

NEXT_REVISION = f"""
CREATE OR REPLACE FUNCTION token_usage_next_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.revision := OLD.revision + CASE
    WHEN {ATTRIBUTION_MOVES} THEN 2
    WHEN NEW.prompt_tokens IS DISTINCT FROM OLD.prompt_tokens
      OR NEW.completion_tokens IS DISTINCT FROM OLD.completion_tokens
      OR NEW.total_tokens IS DISTINCT FROM OLD.total_tokens
      OR NEW.cost_micros IS DISTINCT FROM OLD.cost_micros
      OR NEW.model_breakdown IS DISTINCT FROM OLD.model_breakdown
      OR NEW.source_event_id IS DISTINCT FROM OLD.source_event_id
      OR NEW.source_digest IS DISTINCT FROM OLD.source_digest
    THEN 1 ELSE 0 END;
  RETURN NEW;
END $$
"""

# Which updates moved the attribution, in the statement trigger's transition tables: the ones
# NEXT_REVISION gave two revisions.
MOVED = "n.revision = o.revision + 2"

OUTBOX_REVISED = f"""
CREATE OR REPLACE FUNCTION billing_outbox_revised() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO billing_outbox (usage_id, revision, thread_id, message_id, user_id,
    search_space_id, source, occurred_at, prompt_tokens, completion_tokens, total_tokens,
    cost_micros, model_breakdown, delta_prompt_tokens, delta_completion_tokens,
    delta_total_tokens, delta_cost_micros, reverses)
  SELECT r.* FROM (
    SELECT o.id AS usage_id, o.revision + 1 AS revision, o.thread_id, o.message_id, o.user_id,
      o.search_space_id, o.source, o.source_at, 0::bigint, 0::bigint, 0::bigint, 0::bigint,
      '{{}}'::jsonb, -o.prompt_tokens, -o.completion_tokens, -o.total_tokens, -o.cost_micros,
      o.revision AS reverses
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE {MOVED}
    UNION ALL
    SELECT n.id, n.revision, n.thread_id, n.message_id, n.user_id, n.search_space_id,
      n.source, n.source_at, n.prompt_tokens, n.completion_tokens, n.total_tokens,
      n.cost_micros, n.model_breakdown,
      n.prompt_tokens - CASE WHEN {MOVED} THEN 0 ELSE o.prompt_tokens END,
      n.completion_tokens - CASE WHEN {MOVED} THEN 0 ELSE o.completion_tokens END,
      n.total_tokens - CASE WHEN {MOVED} THEN 0 ELSE o.total_tokens END,
      n.cost_micros - CASE WHEN {MOVED} THEN 0 ELSE o.cost_micros END,
      NULL
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE n.revision <> o.revision
  ) AS r
  -- Outbox ids follow this order: the relay publishes a message's rows in id order, so the
  -- reversal goes out before the revision it makes room for.
  ORDER BY r.usage_id, r.revision;
  RETURN NULL;
END $$
"""  # noqa: S608 - constant SQL, no input

# As 0003 wrote them, for downgrade.
NEXT_REVISION_0003 = """
CREATE OR REPLACE FUNCTION token_usage_next_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.revision := OLD.revision + CASE WHEN
       NEW.prompt_tokens IS DISTINCT FROM OLD.prompt_tokens
    OR NEW.completion_tokens IS DISTINCT FROM OLD.completion_tokens
    OR NEW.total_tokens IS DISTINCT FROM OLD.total_tokens
    OR NEW.cost_micros IS DISTINCT FROM OLD.cost_micros
    OR NEW.model_breakdown IS DISTINCT FROM OLD.model_breakdown
    OR NEW.source_event_id IS DISTINCT FROM OLD.source_event_id
    OR NEW.source_digest IS DISTINCT FROM OLD.source_digest
  THEN 1 ELSE 0 END;
  RETURN NEW;
END $$
"""
OUTBOX_REVISED_0003 = """
CREATE OR REPLACE FUNCTION billing_outbox_revised() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO billing_outbox (usage_id, revision, thread_id, message_id, user_id,
    search_space_id, source, occurred_at, prompt_tokens, completion_tokens, total_tokens,
    cost_micros, model_breakdown, delta_prompt_tokens, delta_completion_tokens,
    delta_total_tokens, delta_cost_micros)
  SELECT n.id, n.revision, n.thread_id, n.message_id, n.user_id, n.search_space_id, n.source,
    n.source_at, n.prompt_tokens, n.completion_tokens, n.total_tokens, n.cost_micros,
    n.model_breakdown, n.prompt_tokens - o.prompt_tokens,
    n.completion_tokens - o.completion_tokens, n.total_tokens - o.total_tokens,
    n.cost_micros - o.cost_micros
  FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
  WHERE n.revision <> o.revision ORDER BY n.id;
  RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.add_column("billing_outbox", sa.Column("reverses", sa.Integer(), nullable=True))
    op.execute(NEXT_REVISION)
    op.execute(OUTBOX_REVISED)


def downgrade() -> None:
    op.execute(OUTBOX_REVISED_0003)
    op.execute(NEXT_REVISION_0003)
    op.drop_column("billing_outbox", "reverses")
