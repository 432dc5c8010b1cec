"""The budget alert record (docs/contract.md#budgets-and-spend-alerts), for chat services that
enforce budgets and for the published contract (producer/contract.py renders its JSON Schema):
a CloudEvents 1.0 structured-mode JSON event per change of a budget threshold's state.

A receiver dedupes by `id` ("{budget id}:{period start}:{measure}:{threshold}:{sequence}");
per (budget, period start, measure, threshold) the record with the highest sequence is the
current state: `ledger.budget.threshold_crossed` (odd sequence) or
`ledger.budget.threshold_withdrawn` (even).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BudgetAlert(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields may be added; never removed

    budget_id: int = Field(ge=1)
    search_space_id: int
    user_id: str | None = Field(description="null for a budget of the whole search space")
    period: Literal["day", "month", "total"] = Field(description="UTC calendar period")
    period_start: datetime = Field(
        description="start of the period (UTC midnight; 0001-01-01T00:00:00Z for total)"
    )
    measure: Literal["cost_micros", "total_tokens"]
    threshold: int = Field(ge=1, le=1000, description="percent of the limit")
    sequence: int = Field(
        ge=1, description="1, 2, ... per (budget, period, measure, threshold): odd crossed"
    )
    spend: int = Field(description="the period's committed spend of the measure")
    limit: int | None = Field(
        description="the limit it was judged against (null: the budget dropped this measure or"
        " threshold, which withdraws it)"
    )
    usage_revision: str | None = Field(
        description="the billing record id ({usage row id}:{revision}) of the usage revision"
        " that caused it (of a transaction's revisions in the period, the one of the highest"
        " usage row id; of a deleted usage row, its last); null when a change of the budget or"
        " a truncation of the ledger's usage did"
    )


class BudgetAlertEvent(BaseModel):
    """CloudEvents 1.0, structured JSON mode; the Kafka key is search_space_id as decimal
    UTF-8."""

    model_config = ConfigDict(extra="allow")  # CloudEvents extension attributes

    specversion: Literal["1.0"]
    id: str = Field(
        pattern=r"^[0-9]+:[0-9]{4}-[0-9]{2}-[0-9]{2}:(cost_micros|total_tokens):[0-9]+:[0-9]+$",
        description="{budget id}:{period start date}:{measure}:{threshold}:{sequence}",
    )
    source: Literal["token-ledger"]
    type: Literal["ledger.budget.threshold_crossed", "ledger.budget.threshold_withdrawn"]
    subject: str = Field(description="search_space_id: the tenant")
    time: datetime = Field(description="when the ledger wrote the change (its transaction's time)")
    datacontenttype: Literal["application/json"]
    data: BudgetAlert
