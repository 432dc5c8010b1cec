"""Drop ix_token_usage_search_space_id_created_at: ix_token_usage_search_space_id_source_at
(migration 0007) replaces it.

A usage row's period is its winning event's occurred_at, `source_at` (migration 0005,
docs/contract.md#billing-attribution): `token-ledger usage`, the usage API and budgets select a
space's rows by it, and nothing selects them by (search_space_id, created_at). Every usage row
written paid for both indexes; keeping only the one that is read takes back what adding 0007's
cost the consumer (docs/development.md#the-usage-api). A billing job that reads the ledger by
period should select on source_at, as the ledger's own reports do.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 04:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_token_usage_search_space_id_created_at", table_name="token_usage")


def downgrade() -> None:
    op.create_index(
        "ix_token_usage_search_space_id_created_at",
        "token_usage",
        ["search_space_id", "created_at"],
    )
