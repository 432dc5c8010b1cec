"""Payload digests in every register: differing copies of one event_id are ordered by them.

docs/contract.md#identity: a register is won by (rank, occurred_at, event_id, SHA-256 of the
canonical payload). Rows written before this revision get the empty digest, which sorts below
every real one; a later copy of the same event then decides by its digest like any other.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EMPTY = sa.text("'\\x'::bytea")


def upgrade() -> None:
    op.add_column("chat_threads", sa.Column("created_by_digest", sa.LargeBinary(), nullable=True))
    op.execute(
        "UPDATE chat_threads SET created_by_digest = '\\x'::bytea"
        " WHERE created_by_event_id IS NOT NULL"
    )
    op.add_column(
        "chat_messages",
        sa.Column("content_digest", sa.LargeBinary(), nullable=False, server_default=EMPTY),
    )
    op.add_column(
        "token_usage",
        sa.Column("source_digest", sa.LargeBinary(), nullable=False, server_default=EMPTY),
    )


def downgrade() -> None:
    op.drop_column("token_usage", "source_digest")
    op.drop_column("chat_messages", "content_digest")
    op.drop_column("chat_threads", "created_by_digest")
