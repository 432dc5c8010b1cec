"""Billing outbox: one row per revision of a message's authoritative usage (docs/contract.md#billing-stream).

Written by triggers on token_usage, so a revision is in the same transaction as the usage row
(and the offsets the batch moves) whatever statement wrote it, and only when it changed:
- BEFORE UPDATE, per row: `revision` + 1 when the billed values or the winning claim change
  (a redelivery, a replay or a losing claim never reaches an UPDATE; attaching a message id
  alone is no revision);
- AFTER INSERT / AFTER UPDATE, per statement, from the transition tables: one INSERT … SELECT
  into billing_outbox with the new values and delta = new - previous (the whole row for a
  created usage).
The relay (consumer/billing/records.py) publishes pending rows in id order and stamps published_at.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MEASURES = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")

# Literal SQL: a migration is frozen history and must not follow later code.
NEXT_REVISION = """
CREATE FUNCTION token_usage_next_revision() RETURNS trigger LANGUAGE plpgsql AS $$
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
OUTBOX_CREATED = """
CREATE FUNCTION billing_outbox_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO billing_outbox (usage_id, revision, thread_id, message_id, user_id,
    search_space_id, source, occurred_at, prompt_tokens, completion_tokens, total_tokens,
    cost_micros, model_breakdown, delta_prompt_tokens, delta_completion_tokens,
    delta_total_tokens, delta_cost_micros)
  SELECT n.id, n.revision, n.thread_id, n.message_id, n.user_id, n.search_space_id, n.source,
    n.source_at, n.prompt_tokens, n.completion_tokens, n.total_tokens, n.cost_micros,
    n.model_breakdown, n.prompt_tokens, n.completion_tokens, n.total_tokens, n.cost_micros
  FROM new_rows AS n ORDER BY n.id;
  RETURN NULL;
END $$
"""
# Usage that exists before this revision is revision 1 of its row, pending like any other, so
# that billing's sum of deltas starts from what the ledger already holds.
BACKFILL = """
INSERT INTO billing_outbox (usage_id, revision, thread_id, message_id, user_id,
  search_space_id, source, occurred_at, prompt_tokens, completion_tokens, total_tokens,
  cost_micros, model_breakdown, delta_prompt_tokens, delta_completion_tokens,
  delta_total_tokens, delta_cost_micros)
SELECT id, revision, thread_id, message_id, user_id, search_space_id, source, source_at,
  prompt_tokens, completion_tokens, total_tokens, cost_micros, model_breakdown,
  prompt_tokens, completion_tokens, total_tokens, cost_micros
FROM token_usage ORDER BY id
"""
OUTBOX_REVISED = """
CREATE FUNCTION billing_outbox_revised() RETURNS trigger LANGUAGE plpgsql AS $$
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
    op.add_column(
        "token_usage",
        sa.Column("revision", sa.Integer(), nullable=False, server_default=sa.text("1")),
    )
    op.create_table(
        "billing_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("usage_id", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("thread_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("search_space_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        *(sa.Column(m, sa.BigInteger(), nullable=False) for m in MEASURES),
        sa.Column("model_breakdown", postgresql.JSONB(), nullable=False),
        *(sa.Column(f"delta_{m}", sa.BigInteger(), nullable=False) for m in MEASURES),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_outbox")),
        sa.UniqueConstraint(
            "usage_id", "revision", name=op.f("uq_billing_outbox_usage_id_revision")
        ),
    )
    # What the relay scans: the pending rows, in id order.
    op.create_index(
        "ix_billing_outbox_pending",
        "billing_outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    # What pruning scans: published rows by age.
    op.create_index(
        "ix_billing_outbox_published_at",
        "billing_outbox",
        ["published_at"],
        unique=False,
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    for statement in (
        NEXT_REVISION,
        "CREATE TRIGGER token_usage_next_revision BEFORE UPDATE ON token_usage"
        " FOR EACH ROW EXECUTE FUNCTION token_usage_next_revision()",
        OUTBOX_CREATED,
        "CREATE TRIGGER billing_outbox_created AFTER INSERT ON token_usage"
        " REFERENCING NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION billing_outbox_created()",
        OUTBOX_REVISED,
        "CREATE TRIGGER billing_outbox_revised AFTER UPDATE ON token_usage"
        " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION billing_outbox_revised()",
        BACKFILL,
    ):
        op.execute(statement)


def downgrade() -> None:
    for name in ("billing_outbox_revised", "billing_outbox_created", "token_usage_next_revision"):
        op.execute(f"DROP TRIGGER {name} ON token_usage")
        op.execute(f"DROP FUNCTION {name}()")
    op.drop_index("ix_billing_outbox_published_at", table_name="billing_outbox")
    op.drop_index("ix_billing_outbox_pending", table_name="billing_outbox")
    op.drop_table("billing_outbox")
    op.drop_column("token_usage", "revision")
