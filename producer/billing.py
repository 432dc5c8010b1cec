"""The billing stream's record (docs/contract.md#billing-stream), for billing consumers and for
the published contract (producer/contract.py renders its JSON Schema): a CloudEvents 1.0
structured-mode JSON event per revision of a message's authoritative usage.

A billing consumer dedupes by `id` ("{usage row id}:{revision}"); summing `data.delta` over
every revision it has seen gives the ledger, supersessions included, and grouped by (`subject`,
`data.user_id`, any bucket of `time`) the ledger grouped the same way: a revision that moves
the usage to another of those follows a reversal (`data.reverses`) under the previous one. Or
it keeps, per usage row (the `id` prefix), the highest revision's full values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class UsageDelta(BaseModel):
    """New minus previous values: the whole usage for revision 1, negative where a smaller
    usage won."""

    model_config = ConfigDict(extra="allow")  # measures may be added; never removed

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int


class UsageRevision(BaseModel):
    model_config = ConfigDict(extra="allow")

    thread_id: int
    turn_id: str | None = Field(description="null for a legacy message without a turn")
    role: Literal["user", "assistant", "system"] | None
    message_id: int | None
    revision: int = Field(ge=1)
    user_id: str | None
    search_space_id: int
    source: Literal["turn.finalized", "message.appended"] = Field(
        description="the type of the event whose usage won"
    )
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    cost_micros: int = Field(ge=0)
    model_breakdown: dict[str, Any] = Field(
        description="per model: the measures the calls of that model add up to"
    )
    delta: UsageDelta
    reverses: int | None = Field(
        default=None,
        ge=1,
        description="set on a reversal: the revision whose attribution (user_id, subject, time)"
        " this one takes back; its measures are 0 and its delta the negative of what that"
        " revision's attribution held. The next revision bills the new attribution.",
    )


class BillingEvent(BaseModel):
    """CloudEvents 1.0, structured JSON mode; the Kafka key is thread_id as decimal UTF-8."""

    model_config = ConfigDict(extra="allow")  # CloudEvents extension attributes

    specversion: Literal["1.0"]
    id: str = Field(pattern=r"^[0-9]+:[0-9]+$", description="{usage row id}:{revision}")
    source: Literal["token-ledger"]
    type: Literal["ledger.token_usage.revised"]
    subject: str = Field(description="search_space_id: the billed tenant")
    time: datetime = Field(description="occurred_at of the winning event")
    datacontenttype: Literal["application/json"]
    data: UsageRevision
