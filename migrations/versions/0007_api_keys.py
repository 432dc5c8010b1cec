"""The usage API (`token-ledger serve`): its keys, its read-only role, and the index its
queries of one search space need.

- `api_keys`: one row per key `token-ledger api-key create` made. Only a digest of the key's
  secret is stored (consumer/api/keys.py), with the public lookup id that finds the row. A key
  is an admin key, or scoped to one search space (and optionally one user of it).
- The group role `token_ledger_api` (NOLOGIN): SELECT on what `serve` reads, nothing else. A
  login role that is a member of it is what LEDGER_API_DATABASE_URL names
  (docs/operations.md#the-usage-api). Roles belong to the cluster, not the database: it is
  created once (several ledgers may share a cluster), and granted in each database migrated.
  A migrating role without CREATEROLE leaves a WARNING naming the statements to run instead.
- `ix_token_usage_search_space_id_source_at`: a space's usage over a period (the report's day
  and month are the winning event's occurred_at, `source_at`), e.g. its month by day by model.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

API_ROLE = "token_ledger_api"
# What `serve` reads: the usage, the keys, and the schema revision it checks at start.
API_READS = ("token_usage", "api_keys", "alembic_version")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        # Public: the part of the key that finds its row (hex, shown by `api-key list`).
        sa.Column("lookup_id", sa.Text(), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("search_space_id", sa.BigInteger(), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column(
            "created_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("revoked_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("lookup_id", name=op.f("uq_api_keys_lookup_id")),
        # Exactly one scope: all of it, or one space (and perhaps one user of it).
        sa.CheckConstraint(
            "admin = (search_space_id IS NULL) AND (user_id IS NULL OR search_space_id IS NOT NULL)",
            name=op.f("ck_api_keys_one_scope"),
        ),
    )
    op.create_index(
        "ix_token_usage_search_space_id_source_at",
        "token_usage",
        ["search_space_id", "source_at"],
    )
    reads = ", ".join(API_READS)
    op.execute(
        f"""
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{API_ROLE}') THEN
    BEGIN
      CREATE ROLE {API_ROLE} NOLOGIN;
    EXCEPTION
      -- another database of the cluster, migrated at the same moment, created it first
      WHEN duplicate_object OR unique_violation THEN NULL;
      WHEN insufficient_privilege THEN
        RAISE WARNING 'token-ledger: this role may not create roles: the usage API has no '
          'read-only role. As a superuser: CREATE ROLE {API_ROLE} NOLOGIN; then in this '
          'database: GRANT SELECT ON {reads} TO {API_ROLE};';
        RETURN;
    END;
  END IF;
  -- PUBLIC has both by default; granted by name where this role may (the owner of the
  -- database and schema), so that a REVOKE from PUBLIC leaves the API its access.
  BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {API_ROLE}', current_database());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO {API_ROLE}', current_schema());
  EXCEPTION WHEN insufficient_privilege THEN NULL;
  END;
  GRANT SELECT ON {reads} TO {API_ROLE};
END
$$;
"""
    )


def downgrade() -> None:
    # The role stays: other databases of the cluster may still grant it. (Constants only.)
    op.execute(
        f"""
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{API_ROLE}') THEN
    REVOKE SELECT ON token_usage, alembic_version FROM {API_ROLE};
    BEGIN
      EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM {API_ROLE}', current_schema());
      EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {API_ROLE}', current_database());
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
  END IF;
END
$$;
"""
    )
    op.drop_index("ix_token_usage_search_space_id_source_at", table_name="token_usage")
    op.drop_table("api_keys")
