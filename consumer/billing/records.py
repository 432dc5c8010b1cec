"""The billing stream's records (docs/contract.md#billing-stream): one usage revision from
`billing_outbox` as a CloudEvents 1.0 structured-mode JSON event. Pure: the relay
(consumer/billing/relay.py) reads the rows and publishes what this returns.

A revision is billed to (subject = search_space_id, data.user_id, time = the winning event's
occurred_at). A revision that moves the usage to another of those comes after a reversal: a
revision with `reverses` set, under the previous attribution, whose delta takes back what that
one billed (docs/contract.md#billing-attribution).

The same outbox row always gives the same bytes (sorted keys, exact numbers), so a revision
published twice (the relay killed between the broker's ack and marking it published) is the
identical record, and consumers dedupe it by `id` ("{usage row id}:{revision}").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

from producer import canonical, jsonvalues
from producer.events import USAGE_MEASURES

EVENT_TYPE = "ledger.token_usage.revised"
EVENT_SOURCE = "token-ledger"
CLOUDEVENTS_VERSION = "1.0"
# The CloudEvents Kafka protocol binding's structured mode: a receiver that sees no such header
# reads the record in binary mode (docs/contract.md#record).
CONTENT_TYPE = "application/cloudevents+json"
HEADERS = (("content-type", CONTENT_TYPE.encode()),)

# The outbox row joined with its message's turn and role (what billing_event reads).
OUTBOX_COLUMNS = (
    "o.id, o.usage_id, o.revision, o.thread_id, o.message_id, o.user_id, o.search_space_id,"
    " o.source, o.occurred_at, o.model_breakdown, o.reverses, m.turn_id, m.role, "
    + ", ".join(f"o.{m}" for m in USAGE_MEASURES)
    + ", "
    + ", ".join(f"o.delta_{m}" for m in USAGE_MEASURES)
)


def billing_event(row: Mapping[str, Any]) -> dict[str, Any]:
    """The CloudEvent of one outbox row (see OUTBOX_COLUMNS)."""
    occurred_at = row["occurred_at"].astimezone(UTC)
    user_id = row["user_id"]
    return {
        "specversion": CLOUDEVENTS_VERSION,
        "id": f"{row['usage_id']}:{row['revision']}",
        "source": EVENT_SOURCE,
        "type": EVENT_TYPE,
        "subject": str(row["search_space_id"]),
        "time": occurred_at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {
            "thread_id": row["thread_id"],
            "turn_id": row["turn_id"],
            "role": row["role"],
            "message_id": row["message_id"],
            "revision": row["revision"],
            "user_id": None if user_id is None else str(user_id),
            "search_space_id": row["search_space_id"],
            "source": row["source"],
            **{m: row[m] for m in USAGE_MEASURES},
            "model_breakdown": jsonvalues.loads(row["model_breakdown"]),
            "delta": {m: row[f"delta_{m}"] for m in USAGE_MEASURES},
            "reverses": row["reverses"],
        },
    }


def encode(event: Mapping[str, Any]) -> bytes:
    return canonical.sorted_bytes(event)
