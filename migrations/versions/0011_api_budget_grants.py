"""The usage API's role reads the columns of budgets and budget_states its budget routes name.

`GET /v1/budgets` and `/v1/budgets/{id}` answer from the query of `token-ledger budget list`
(consumer/commands/budgets.py BUDGET_COLUMNS; a test holds the two equal): each budget's scope,
period, limits and thresholds, and which thresholds its current period crossed. Only those
columns are granted (as 0008 does for token_usage), so a leaked API role reads no more than
the API could answer: not the budgets' timestamps, nor the states' spends and sequences, nor
the alert outbox. The spend itself is summed from token_usage's columns granted by 0008.

`serve` of this release refuses (exit 7, naming the column) a database migrated only to 0010,
so migrate before replacing `serve`. The consumer is not concerned.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

API_ROLE = "token_ledger_api"
# Frozen here, as a migration's statements must be: what the budget routes read at this
# revision.
API_COLUMNS = {
    "budgets": (
        "id",
        "search_space_id",
        "user_id",
        "period",
        "cost_micros_limit",
        "total_tokens_limit",
        "thresholds",
    ),
    "budget_states": ("budget_id", "period_start", "measure", "threshold", "crossed"),
}


def _grants() -> str:
    return " ".join(
        f"GRANT SELECT ({', '.join(columns)}) ON {table} TO {API_ROLE};"
        for table, columns in API_COLUMNS.items()
    )


def upgrade() -> None:
    grants = _grants()
    # The role belongs to the cluster: a migrating role that could not create it (0007 warned)
    # gets the statements to run once a superuser has, rather than a failed migration.
    op.execute(
        f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{API_ROLE}') THEN
    {grants}
  ELSE
    RAISE WARNING 'token-ledger: there is no role {API_ROLE} (see migration 0007''s warning). '
      'Once a superuser made it, in this database: {grants}';
  END IF;
END
$$;
"""
    )


def downgrade() -> None:
    # Revoking the table privilege takes the column grants with it.
    tables = ", ".join(API_COLUMNS)
    op.execute(
        f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{API_ROLE}') THEN
    REVOKE SELECT ON {tables} FROM {API_ROLE};
  END IF;
END
$$;
"""
    )
