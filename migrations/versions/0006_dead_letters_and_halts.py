"""What each consumer group dead-lettered, and which of its partitions are stopped.

- `dead_lettered`: one row per source record a group sent to the dead-letter topic, written in
  the batch transaction that moves the offsets past it. An offset `replay` reads the same
  records again; a position already here, holding the same value (`value_digest`), is not sent
  (or counted) a second time (docs/operations.md#dead-letters).
- `partition_halts`: a partition a consumer stopped (a dead letter the topic refuses, a stored
  offset outside the log), with why, until an owner opens the partition again. `token-ledger
  status` reads it: the reason lives with the ledger, not only in one process's /readyz.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_lettered",
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        # SHA-256 of the record's value: a position read again holding another record (the
        # topic recreated) is dead-lettered again, never taken for the one already sent.
        sa.Column("value_digest", sa.LargeBinary(), nullable=False),
        sa.Column(
            "dead_lettered_at",
            sa.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint(
            "group_id", "topic", "partition", "offset", name=op.f("pk_dead_lettered")
        ),
    )
    op.create_table(
        "partition_halts",
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "halted_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("group_id", "topic", "partition", name=op.f("pk_partition_halts")),
    )


def downgrade() -> None:
    op.drop_table("partition_halts")
    op.drop_table("dead_lettered")
