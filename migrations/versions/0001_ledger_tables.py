"""Ledger tables: threads, messages, token usage, consumer offsets (docs/contract.md#tables).

Revision ID: 0001
Revises:
Create Date: 2026-11-26 06:29:50.433347
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "chat_threads",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("search_space_id", sa.BigInteger(), nullable=False),
        sa.Column("created_by_id", sa.Uuid(), nullable=True),
        sa.Column("created_by_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by_event_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id > 0", name=op.f("ck_chat_threads_id_positive")),
        sa.CheckConstraint(
            "search_space_id > 0", name=op.f("ck_chat_threads_search_space_id_positive")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_threads")),
    )
    op.create_table(
        "consumer_offsets",
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "next_offset >= 0", name=op.f("ck_consumer_offsets_next_offset_non_negative")
        ),
        sa.PrimaryKeyConstraint("group_id", "topic", "partition", name=op.f("pk_consumer_offsets")),
    )
    op.create_table(
        "chat_messages",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("thread_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("turn_id", sa.String(length=64), nullable=True),
        sa.Column("content", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("author_id", sa.Uuid(), nullable=True),
        sa.Column("content_rank", sa.SmallInteger(), nullable=False),
        sa.Column("content_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content_event_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "role IN ('user', 'assistant', 'system')", name=op.f("ck_chat_messages_role")
        ),
        sa.CheckConstraint(
            "content_rank BETWEEN 0 AND 2", name=op.f("ck_chat_messages_content_rank")
        ),
        sa.ForeignKeyConstraint(
            ["thread_id"],
            ["chat_threads.id"],
            name=op.f("fk_chat_messages_thread_id_chat_threads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_messages")),
    )
    op.create_index("ix_chat_messages_thread_id", "chat_messages", ["thread_id"], unique=False)
    op.create_index(
        "uq_chat_messages_content_event_id",
        "chat_messages",
        ["content_event_id"],
        unique=True,
        postgresql_where=sa.text("turn_id IS NULL"),
    )
    op.create_index(
        "uq_chat_messages_thread_turn_role",
        "chat_messages",
        ["thread_id", "turn_id", "role"],
        unique=True,
        postgresql_where=sa.text("turn_id IS NOT NULL"),
    )
    op.create_table(
        "token_usage",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("usage_type", sa.String(length=16), server_default="chat", nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("model_breakdown", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("call_details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("thread_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("search_space_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("source_rank", sa.SmallInteger(), nullable=False),
        sa.Column("source_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_event_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "source IN ('turn.finalized', 'message.appended')", name=op.f("ck_token_usage_source")
        ),
        sa.CheckConstraint("usage_type = 'chat'", name=op.f("ck_token_usage_usage_type")),
        sa.CheckConstraint("cost_micros >= 0", name=op.f("ck_token_usage_cost_non_negative")),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND total_tokens >= 0",
            name=op.f("ck_token_usage_tokens_non_negative"),
        ),
        sa.CheckConstraint("source_rank BETWEEN 1 AND 2", name=op.f("ck_token_usage_source_rank")),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["chat_messages.id"],
            name=op.f("fk_token_usage_message_id_chat_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["thread_id"],
            ["chat_threads.id"],
            name=op.f("fk_token_usage_thread_id_chat_threads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_token_usage")),
    )
    op.create_index(
        "ix_token_usage_search_space_id_created_at",
        "token_usage",
        ["search_space_id", "created_at"],
        unique=False,
    )
    op.create_index("ix_token_usage_thread_id", "token_usage", ["thread_id"], unique=False)
    op.create_index(
        "ix_token_usage_user_id_created_at", "token_usage", ["user_id", "created_at"], unique=False
    )
    op.create_index(
        "uq_token_usage_message_id",
        "token_usage",
        ["message_id"],
        unique=True,
        postgresql_where=sa.text("message_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_token_usage_message_id",
        table_name="token_usage",
        postgresql_where=sa.text("message_id IS NOT NULL"),
    )
    op.drop_index("ix_token_usage_user_id_created_at", table_name="token_usage")
    op.drop_index("ix_token_usage_thread_id", table_name="token_usage")
    op.drop_index("ix_token_usage_search_space_id_created_at", table_name="token_usage")
    op.drop_table("token_usage")
    op.drop_index(
        "uq_chat_messages_thread_turn_role",
        table_name="chat_messages",
        postgresql_where=sa.text("turn_id IS NOT NULL"),
    )
    op.drop_index(
        "uq_chat_messages_content_event_id",
        table_name="chat_messages",
        postgresql_where=sa.text("turn_id IS NULL"),
    )
    op.drop_index("ix_chat_messages_thread_id", table_name="chat_messages")
    op.drop_table("chat_messages")
    op.drop_table("consumer_offsets")
    op.drop_table("chat_threads")
