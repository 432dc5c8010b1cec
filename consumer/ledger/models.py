"""The ledger's tables as SQLAlchemy Core metadata.

Migrations are the only source of schema: these definitions exist so that a test can prove
(alembic autogenerate against a migrated database) that code and migrations agree. The
register columns (`*_rank`, `*_at`, `*_event_id`) hold the (rank, occurred_at, event_id) of
the event that won the row, which is what makes every write order-independent.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from producer.events import USAGE_MEASURES

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

TIMESTAMP = DateTime(timezone=True)
EMPTY_DIGEST = text("'\\x'::bytea")

chat_threads = Table(
    "chat_threads",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("search_space_id", BigInteger, nullable=False),
    Column("created_by_id", Uuid, nullable=True),
    # (occurred_at, event_id, digest) of the event that set created_by_id: the earliest one
    # with a user.
    Column("created_by_at", TIMESTAMP, nullable=True),
    Column("created_by_event_id", Uuid, nullable=True),
    Column("created_by_digest", LargeBinary, nullable=True),
    Column("created_at", TIMESTAMP, nullable=False),
    Column("updated_at", TIMESTAMP, nullable=False),
    CheckConstraint("id > 0", name="id_positive"),
    CheckConstraint("search_space_id > 0", name="search_space_id_positive"),
)

chat_messages = Table(
    "chat_messages",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "thread_id",
        BigInteger,
        ForeignKey("chat_threads.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("role", String(16), nullable=False),
    Column("turn_id", String(64), nullable=True),
    Column("content", JSONB, nullable=False),
    Column("author_id", Uuid, nullable=True),
    Column("content_rank", SmallInteger, nullable=False),
    Column("content_at", TIMESTAMP, nullable=False),
    Column("content_event_id", Uuid, nullable=False),
    Column("content_digest", LargeBinary, nullable=False, server_default=EMPTY_DIGEST),
    Column("created_at", TIMESTAMP, nullable=False),
    Column("updated_at", TIMESTAMP, nullable=False),
    CheckConstraint("role IN ('user', 'assistant', 'system')", name="role"),
    CheckConstraint("content_rank BETWEEN 0 AND 2", name="content_rank"),
    Index("ix_chat_messages_thread_id", "thread_id"),
    Index(
        "uq_chat_messages_thread_turn_role",
        "thread_id",
        "turn_id",
        "role",
        unique=True,
        postgresql_where=text("turn_id IS NOT NULL"),
    ),
    # A message without turn_id is keyed by the event that created it (and its copies).
    Index(
        "uq_chat_messages_content_event_id",
        "content_event_id",
        unique=True,
        postgresql_where=text("turn_id IS NULL"),
    ),
)

token_usage = Table(
    "token_usage",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("usage_type", String(16), nullable=False, server_default="chat"),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("model_breakdown", JSONB, nullable=False),
    Column("call_details", JSONB, nullable=False),
    Column(
        "thread_id",
        BigInteger,
        ForeignKey("chat_threads.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "message_id",
        BigInteger,
        ForeignKey("chat_messages.id", ondelete="CASCADE"),
        nullable=True,
    ),
    Column("search_space_id", BigInteger, nullable=False),
    Column("user_id", Uuid, nullable=True),
    Column("source", String(32), nullable=False),
    Column("source_rank", SmallInteger, nullable=False),
    Column("source_at", TIMESTAMP, nullable=False),
    Column("source_event_id", Uuid, nullable=False),
    Column("source_digest", LargeBinary, nullable=False, server_default=EMPTY_DIGEST),
    Column("created_at", TIMESTAMP, nullable=False),
    Column("updated_at", TIMESTAMP, nullable=False),
    # 1, 2, … per change of the billed values or of the winning claim (a trigger counts them:
    # migrations/versions/0003_billing_outbox.py); the billing stream's revision number.
    Column("revision", Integer, nullable=False, server_default=text("1")),
    CheckConstraint("usage_type = 'chat'", name="usage_type"),
    CheckConstraint(
        "prompt_tokens >= 0 AND completion_tokens >= 0 AND total_tokens >= 0",
        name="tokens_non_negative",
    ),
    CheckConstraint("cost_micros >= 0", name="cost_non_negative"),
    CheckConstraint("source IN ('turn.finalized', 'message.appended')", name="source"),
    CheckConstraint("source_rank BETWEEN 1 AND 2", name="source_rank"),
    Index(
        "uq_token_usage_message_id",
        "message_id",
        unique=True,
        postgresql_where=text("message_id IS NOT NULL"),
    ),
    Index("ix_token_usage_thread_id", "thread_id"),
    Index("ix_token_usage_user_id_created_at", "user_id", "created_at"),
    # A space's usage over a period, by the report's time (the usage API: migrations 0007).
    Index("ix_token_usage_search_space_id_source_at", "search_space_id", "source_at"),
)

# One row per usage revision, written by token_usage's triggers in the transaction that changed
# the usage; consumer/billing/records.py publishes the pending ones (published_at IS NULL).
billing_outbox = Table(
    "billing_outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("usage_id", BigInteger, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("thread_id", BigInteger, nullable=False),
    Column("message_id", BigInteger, nullable=True),
    Column("user_id", Uuid, nullable=True),
    Column("search_space_id", BigInteger, nullable=False),
    Column("source", String(32), nullable=False),
    Column("occurred_at", TIMESTAMP, nullable=False),
    *(Column(m, BigInteger, nullable=False) for m in USAGE_MEASURES),
    Column("model_breakdown", JSONB, nullable=False),
    *(Column(f"delta_{m}", BigInteger, nullable=False) for m in USAGE_MEASURES),
    Column("created_at", TIMESTAMP, nullable=False, server_default=func.now()),
    Column("published_at", TIMESTAMP, nullable=True),
    # A reversal: the revision whose attribution it takes back (migrations/versions/0005).
    Column("reverses", Integer, nullable=True),
    UniqueConstraint("usage_id", "revision"),
    Index("ix_billing_outbox_pending", "id", postgresql_where=text("published_at IS NULL")),
    Index(
        "ix_billing_outbox_published_at",
        "published_at",
        postgresql_where=text("published_at IS NOT NULL"),
    ),
)

consumer_offsets = Table(
    "consumer_offsets",
    metadata,
    Column("group_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", TIMESTAMP, nullable=False),
    # The greatest next_offset ever committed: `replay` moves next_offset back, not this.
    Column("applied_until", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("group_id", "topic", "partition"),
    CheckConstraint("next_offset >= 0", name="next_offset_non_negative"),
)

# A source record the group dead-lettered, written with the offsets that move past it
# (migrations/versions/0006): a record read again is not dead-lettered again.
dead_lettered = Table(
    "dead_lettered",
    metadata,
    Column("group_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("value_digest", LargeBinary, nullable=False),  # SHA-256 of the record's value
    Column("dead_lettered_at", TIMESTAMP, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("group_id", "topic", "partition", "offset"),
)

# The records a group applied, by position: 16 bytes per offset (the event type's code, 0 for
# none, and a fingerprint of the record), one row per block of offsets (consumer/ledger/
# applied.py, migrations/versions/0013).
applied_records = Table(
    "applied_records",
    metadata,
    Column("group_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("first_offset", BigInteger, nullable=False),
    Column("entries", LargeBinary, nullable=False),
    PrimaryKeyConstraint("group_id", "topic", "partition", "first_offset"),
)

# A partition a consumer stopped, and why, until an owner opens it again (`token-ledger status`).
partition_halts = Table(
    "partition_halts",
    metadata,
    Column("group_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("halted_at", TIMESTAMP, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("group_id", "topic", "partition"),
)

# A key of the usage API (`token-ledger api-key`, migrations/versions/0007): a digest of its
# secret, never the secret; admin, or one search space (and perhaps one user of it).
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("lookup_id", Text, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("admin", Boolean, nullable=False, server_default=text("false")),
    Column("search_space_id", BigInteger, nullable=True),
    Column("user_id", Uuid, nullable=True),
    Column("created_at", TIMESTAMP, nullable=False, server_default=func.now()),
    Column("revoked_at", TIMESTAMP, nullable=True),
    UniqueConstraint("lookup_id"),
    CheckConstraint(
        "admin = (search_space_id IS NULL) AND (user_id IS NULL OR search_space_id IS NOT NULL)",
        name="one_scope",
    ),
)

# A budget (`token-ledger budget`, migrations/versions/0010): one per scope and period.
budgets = Table(
    "budgets",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("search_space_id", BigInteger, nullable=False),
    Column("user_id", Uuid, nullable=True),
    Column("period", Text, nullable=False),
    Column("cost_micros_limit", BigInteger, nullable=True),
    Column("total_tokens_limit", BigInteger, nullable=True),
    Column("thresholds", ARRAY(SmallInteger), nullable=False, server_default=text("'{50,80,100}'")),
    Column("created_at", TIMESTAMP, nullable=False, server_default=func.now()),
    Column("updated_at", TIMESTAMP, nullable=False, server_default=func.now()),
    CheckConstraint("period IN ('day', 'month', 'total')", name="period"),
    CheckConstraint(
        "cost_micros_limit IS NOT NULL OR total_tokens_limit IS NOT NULL", name="a_limit"
    ),
    CheckConstraint("cost_micros_limit > 0 AND total_tokens_limit > 0", name="limits"),
    CheckConstraint(
        "cardinality(thresholds) BETWEEN 1 AND 20 AND 1 <= ALL(thresholds)"
        " AND 1000 >= ALL(thresholds) AND array_position(thresholds, NULL) IS NULL",
        name="thresholds",
    ),
    Index(
        "uq_budgets_search_space_id_period",
        "search_space_id",
        "period",
        unique=True,
        postgresql_where=text("user_id IS NULL"),
    ),
    Index(
        "uq_budgets_search_space_id_user_id_period",
        "search_space_id",
        "user_id",
        "period",
        unique=True,
        postgresql_where=text("user_id IS NOT NULL"),
    ),
)

# Whether a (budget, period, measure, threshold) has crossed, from its first crossing on (none:
# never crossed), written by budget_judge in the transaction that changed the period's usage or
# the budget (migrations/versions/0012).
budget_states = Table(
    "budget_states",
    metadata,
    Column("budget_id", BigInteger, ForeignKey("budgets.id", ondelete="CASCADE"), nullable=False),
    Column("period_start", TIMESTAMP, nullable=False),
    Column("measure", Text, nullable=False),
    Column("threshold", SmallInteger, nullable=False),
    Column("limit_value", BigInteger, nullable=True),
    Column("crossed", Boolean, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("spend", Numeric, nullable=False),  # a period's sum may pass 2^63 - 1
    Column("updated_at", TIMESTAMP, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("budget_id", "period_start", "measure", "threshold"),
    CheckConstraint("crossed = (sequence % 2 = 1)", name="parity"),
)

# Each budget period's spend (the sums of its scope's usage rows in that period, kept by the
# statement that changes the rows) and the limits it is judged under, set when it is first
# judged (migrations/versions/0012).
budget_periods = Table(
    "budget_periods",
    metadata,
    Column("budget_id", BigInteger, ForeignKey("budgets.id", ondelete="CASCADE"), nullable=False),
    Column("period_start", TIMESTAMP, nullable=False),
    Column("cost_micros", Numeric, nullable=False),  # a period's sum may pass 2^63 - 1
    Column("total_tokens", Numeric, nullable=False),
    Column("cost_micros_limit", BigInteger, nullable=True),
    Column("total_tokens_limit", BigInteger, nullable=True),
    Column("thresholds", ARRAY(SmallInteger), nullable=True),
    PrimaryKeyConstraint("budget_id", "period_start"),
)

# One row per change of a budget state; the relay publishes the pending ones.
budget_alert_outbox = Table(
    "budget_alert_outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("budget_id", BigInteger, nullable=False),
    Column("search_space_id", BigInteger, nullable=False),
    Column("user_id", Uuid, nullable=True),
    Column("period", Text, nullable=False),
    Column("period_start", TIMESTAMP, nullable=False),
    Column("measure", Text, nullable=False),
    Column("threshold", SmallInteger, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("crossed", Boolean, nullable=False),
    Column("spend", Numeric, nullable=False),  # a period's sum may pass 2^63 - 1
    Column("limit_value", BigInteger, nullable=True),
    Column("usage_id", BigInteger, nullable=True),
    Column("usage_revision", Integer, nullable=True),
    Column("created_at", TIMESTAMP, nullable=False, server_default=func.now()),
    Column("published_at", TIMESTAMP, nullable=True),
    UniqueConstraint(
        "budget_id",
        "period_start",
        "measure",
        "threshold",
        "sequence",
        name="uq_budget_alert_outbox_state_sequence",
    ),
    Index("ix_budget_alert_outbox_pending", "id", postgresql_where=text("published_at IS NULL")),
    Index(
        "ix_budget_alert_outbox_published_at",
        "published_at",
        postgresql_where=text("published_at IS NOT NULL"),
    ),
)

# Tables of the usage API, not of the ledger the consumer writes (schema.py's privilege check).
API_TABLES = frozenset({"api_keys"})
