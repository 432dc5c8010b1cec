"""The budget alert stream's records (docs/contract.md#budgets-and-spend-alerts): one row of
`budget_alert_outbox` as a CloudEvents 1.0 structured-mode JSON event. Pure, like records.py for
usage revisions: the relay reads the rows and publishes what this returns, and the same row
always gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from consumer.billing.budget_rules import alert_id
from consumer.billing.records import CLOUDEVENTS_VERSION, EVENT_SOURCE

CROSSED = "ledger.budget.threshold_crossed"
WITHDRAWN = "ledger.budget.threshold_withdrawn"
ALERT_COLUMNS = (
    "id, budget_id, search_space_id, user_id, period, period_start, measure, threshold,"
    " sequence, crossed, spend, limit_value, usage_id, usage_revision, created_at"
)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def budget_alert_event(row: Mapping[str, Any]) -> dict[str, Any]:
    """The CloudEvent of one alert outbox row (see ALERT_COLUMNS)."""
    start: datetime = row["period_start"]
    user_id = row["user_id"]
    return {
        "specversion": CLOUDEVENTS_VERSION,
        "id": alert_id(row["budget_id"], start, row["measure"], row["threshold"], row["sequence"]),
        "source": EVENT_SOURCE,
        "type": CROSSED if row["crossed"] else WITHDRAWN,
        "subject": str(row["search_space_id"]),
        "time": _utc(row["created_at"]),
        "datacontenttype": "application/json",
        "data": {
            "budget_id": row["budget_id"],
            "search_space_id": row["search_space_id"],
            "user_id": None if user_id is None else str(user_id),
            "period": row["period"],
            "period_start": start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "measure": row["measure"],
            "threshold": row["threshold"],
            "sequence": row["sequence"],
            "spend": int(row["spend"]),  # numeric: exact, whatever its size
            "limit": row["limit_value"],
            "usage_revision": None
            if row["usage_id"] is None
            else f"{row['usage_id']}:{row['usage_revision']}",
        },
    }


def alert_key(row: Mapping[str, Any]) -> bytes:
    """The Kafka key: the search space, so a tenant's alerts keep their order."""
    return str(row["search_space_id"]).encode()
