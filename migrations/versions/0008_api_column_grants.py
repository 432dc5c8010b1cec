"""The usage API's role reads only the columns of token_usage its queries name.

Migration 0007 granted `token_ledger_api` SELECT on the whole of token_usage, `call_details`
included: each call's raw details as the producer sent them, which the API never returns.
This revokes that and grants SELECT on the report's columns alone (consumer/commands/queries.py
REPORT_COLUMNS; a test holds the two equal), so that a leaked API role reads no more than the
API could answer (docs/operations.md#the-usage-api). `api_keys` and `alembic_version` keep
their table grants: `serve` reads what it needs of them, and they hold nothing a producer sent.

`serve` of a release that knows only 0007 asks for the table grant and reads `u.*`: it stops
(exit 7) on a database migrated to 0008, so migrate and replace `serve` together. The consumer
is not concerned.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 02:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

API_ROLE = "token_ledger_api"
# Frozen here, as a migration's statements must be: what the report read at this revision.
API_COLUMNS = (
    "id",
    "user_id",
    "search_space_id",
    "source_at",
    "model_breakdown",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_micros",
)


def upgrade() -> None:
    columns = ", ".join(API_COLUMNS)
    # Revoking a table's privilege revokes it on each of its columns too: grant them after.
    op.execute(
        f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{API_ROLE}') THEN
    REVOKE SELECT ON token_usage FROM {API_ROLE};
    GRANT SELECT ({columns}) ON token_usage TO {API_ROLE};
  ELSE
    RAISE WARNING 'token-ledger: there is no role {API_ROLE} (see the previous warning). '
      'Once a superuser made it, in this database (in place of the previous warning''s grant: '
      'not the whole of token_usage): GRANT SELECT ON api_keys, alembic_version TO {API_ROLE}; '
      'REVOKE SELECT ON token_usage FROM {API_ROLE}; '
      'GRANT SELECT ({columns}) ON token_usage TO {API_ROLE};';
  END IF;
END
$$;
"""
    )


def downgrade() -> None:
    # 0007's grant again: the whole table (its REVOKE takes the column grants with it).
    op.execute(
        f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{API_ROLE}') THEN
    REVOKE SELECT ON token_usage FROM {API_ROLE};
    GRANT SELECT ON token_usage TO {API_ROLE};
  END IF;
END
$$;
"""
    )
