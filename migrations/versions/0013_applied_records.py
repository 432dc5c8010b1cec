"""applied_records: the records each consumer group applied, by position, with a fingerprint
of each, so that a record read again is recognised before it is decoded (docs/design.md#
redeliveries; consumer/ledger/applied.py).

One row per partition and block of 64 offsets (`first_offset`, the block's first), written by
the batch transaction with the offsets: 16 bytes per offset, the event type's code (0: nothing
applied there) and a BLAKE2b fingerprint of the record's value and timestamp. Records applied
before this revision have no row: read again, they are decoded and applied as before (changing
nothing), and recorded then. The entries are random bytes: never compressed.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "applied_records",
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("first_offset", sa.BigInteger(), nullable=False),
        sa.Column("entries", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint(
            "group_id", "topic", "partition", "first_offset", name=op.f("pk_applied_records")
        ),
    )
    op.execute("ALTER TABLE applied_records ALTER COLUMN entries SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("applied_records")
