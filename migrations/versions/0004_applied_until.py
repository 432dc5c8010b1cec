"""The furthest each partition was ever applied, beside where it stands.

`replay` moves next_offset back while the ledger keeps every row of the records past it, so
`verify` reads the topic up to `applied_until` (the greatest next_offset a batch ever
committed) to rebuild the ledger the database holds. A batch raises it with its offsets; a
rewind raises it to the offset it rewinds from (also written by an older release's consumer,
which does not keep it); an offset reset backward (a log younger than the ledger) sets it
where the reset goes. Rows written before this revision start at their next_offset.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "consumer_offsets",
        sa.Column("applied_until", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute("UPDATE consumer_offsets SET applied_until = next_offset")


def downgrade() -> None:
    op.drop_column("consumer_offsets", "applied_until")
