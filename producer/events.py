"""The event contract (docs/contract.md): the envelope, the three event types, the v0 legacy
body, and why a record is rejected. These models are the published contract: the JSON Schemas
and the AsyncAPI document are generated from them (producer/contract.py), chat services build
events with them, and the consumer's decoder (producer/decoding.py) validates with them.

Every event on `chat.turn-events` is UTF-8 JSON with a common envelope (event_id, type,
schema_version, occurred_at, thread_id, search_space_id, user_id, turn_id). Schema versions: 1
is current; version 0 is the legacy frontend's append body, upcast by the decoder. Forward
compatibility (docs/contract.md#forward-compatibility): a field this consumer does not know is
accepted; inside a content part, a usage call or a legacy per-model breakdown it is kept
(stored as sent), elsewhere ignored. `occurred_at` is normalised to UTC, so no later comparison
can overflow.

Also the per-model attribution rule (docs/contract.md#per-model-attribution); the event as the
ledger sees it is producer/ledger_event.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

from producer import jsonvalues

CURRENT_SCHEMA_VERSION = 1
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
MAX_INT64 = 2**63 - 1
# Fixed namespace for the event_id of upcast v0 bodies: identical re-sends get identical ids.
LEGACY_EVENT_NAMESPACE = uuid.UUID("6f1d8a52-4a8e-5c2b-9d0e-7b3f2a9c4e11")

DEFAULT_MAX_FUTURE_SKEW = timedelta(hours=1)
USAGE_MEASURES = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")
# The share of a usage row's totals that its per-model breakdown does not cover
# (docs/contract.md#per-model-attribution).
UNATTRIBUTED = "(unattributed)"
# Kinds of tokens a call may report besides its measures (today's LLM APIs do): summed per model
# into the usage row's model_breakdown when present, never into the row's totals.
TOKEN_KINDS = ("cached_tokens", "reasoning_tokens")

Id64 = Annotated[int, Field(ge=1, le=MAX_INT64)]
Count64 = Annotated[int, Field(ge=0, le=MAX_INT64)]
TurnId = Annotated[str, Field(min_length=1, max_length=64)]


class RejectReason(StrEnum):
    """Why a record went to the dead-letter topic (the `ledger.error.reason` header)."""

    EMPTY_VALUE = "empty_value"  # tombstone / null value
    TOO_LARGE = "too_large"  # over LEDGER_MAX_EVENT_BYTES
    INVALID_UTF8 = "invalid_utf8"
    NUL_CHARACTER = "nul_character"  # PostgreSQL text/jsonb cannot hold U+0000
    INVALID_JSON = "invalid_json"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"  # schema_version newer than this consumer knows
    SCHEMA_INVALID = "schema_invalid"  # well-formed JSON that breaks a field rule
    OCCURRED_AT_IN_FUTURE = "occurred_at_in_future"  # beyond LEDGER_MAX_FUTURE_SKEW
    THREAD_SEARCH_SPACE_MISMATCH = "thread_search_space_mismatch"
    EVENT_ID_CONFLICT = "event_id_conflict"  # one event_id would have to create two rows
    DATABASE_REJECTED = "database_rejected"  # SQLSTATE class 22/23 isolated to this record


_RFC3339_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]")


def _text_or_datetime(value: object) -> object:
    # Lax mode would read a number, or a number in a string, as a Unix time; the contract says
    # RFC 3339 text.
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339_DATE.match(value)):
        return value
    raise ValueError("expected an RFC 3339 timestamp string")


def _exact_int(value: object) -> object:
    # A Literal accepts anything equal to it: True == 1 and Decimal("1.0") == 1.
    if type(value) is int:
        return value
    raise ValueError("expected an integer")


SchemaVersion = BeforeValidator(_exact_int)


# asyncpg reads these two instants back as PostgreSQL's -infinity/infinity (naive datetimes),
# which would then not compare with any other occurred_at: keep them out of the ledger.
_UNSTORABLE = frozenset((datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)))


def _in_utc(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp outside years 1..9999 in UTC") from None
    if utc in _UNSTORABLE:
        raise ValueError("timestamp at the very edge of years 1..9999 (reserved for infinity)")
    return utc


def _uuid_text(value: object) -> object:
    if isinstance(value, str | uuid.UUID):
        return value
    raise ValueError("expected a UUID string")


# JSON gives text for these; strict mode would accept only Python instances.
Timestamp = Annotated[
    AwareDatetime, Field(strict=False), BeforeValidator(_text_or_datetime), AfterValidator(_in_utc)
]
Uuid = Annotated[uuid.UUID, Field(strict=False), BeforeValidator(_uuid_text)]


class _Strict(BaseModel):
    """Strict types; fields this consumer does not know are ignored (and counted)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Open(BaseModel):
    """Strict types; fields this consumer does not know are kept and stored as sent."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class ContentPart(BaseModel):
    """One part of a message's content: any JSON object with a string `type`."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    type: str


class UsageCall(_Open):
    """One LLM call; fields added by newer producers stay in call_details."""

    model: str = Field(min_length=1, max_length=200)
    prompt_tokens: Count64
    completion_tokens: Count64
    total_tokens: Count64
    cost_micros: Count64
    call_kind: str = Field(min_length=1, max_length=64)
    # TOKEN_KINDS: prompt tokens served from a cache, completion tokens spent on reasoning.
    cached_tokens: Count64 | None = None
    reasoning_tokens: Count64 | None = None


class TurnUsage(_Strict):
    calls: list[UsageCall]

    @model_validator(mode="after")
    def _sums_fit_bigint(self) -> Self:
        if len(self.calls) < 2:
            return self  # one call's numbers are each within 2^63-1 already
        for name in (*USAGE_MEASURES, *TOKEN_KINDS):
            if sum(getattr(call, name) or 0 for call in self.calls) > MAX_INT64:
                raise ValueError(f"sum of {name} over the calls exceeds 2^63-1")
        return self


class ModelUsage(_Open):
    """One model's entry in a legacy breakdown: any subset of the measures, stored as sent."""

    prompt_tokens: Count64 | None = None
    completion_tokens: Count64 | None = None
    total_tokens: Count64 | None = None
    cost_micros: Count64 | None = None


class LegacyTokenUsage(_Strict):
    """`token_usage` of message.appended: totals, per-model `usage`, free-form `call_details`."""

    prompt_tokens: Count64
    completion_tokens: Count64
    total_tokens: Count64
    cost_micros: Count64
    usage: dict[str, ModelUsage] | None = None
    call_details: list[dict[str, Any]] | dict[str, Any] | None = None


class _Envelope(_Strict):
    event_id: Uuid
    schema_version: Annotated[Literal[1], SchemaVersion]
    occurred_at: Timestamp
    thread_id: Id64
    search_space_id: Id64
    user_id: Uuid | None


class TurnStarted(_Envelope):
    type: Literal["turn.started"]
    turn_id: TurnId
    user_query: str
    mentioned_documents: list[dict[str, Any]] = Field(default_factory=list)


class TurnFinalized(_Envelope):
    type: Literal["turn.finalized"]
    turn_id: TurnId
    content: list[ContentPart]
    usage: TurnUsage | None = None

    @model_validator(mode="after")
    def _usage_has_a_user(self) -> Self:
        if self.usage is not None and self.usage.calls and self.user_id is None:
            raise ValueError("usage calls need a user_id to bill")
        return self


class MessageAppended(_Envelope):
    type: Literal["message.appended"]
    turn_id: TurnId | None = None
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    token_usage: LegacyTokenUsage | None = None

    @model_validator(mode="after")
    def _usage_on_assistant_only(self) -> Self:
        if self.token_usage is not None and self.role != "assistant":
            raise ValueError("token_usage is accepted on assistant messages only")
        return self


Event = Annotated[TurnStarted | TurnFinalized | MessageAppended, Field(discriminator="type")]
EVENT_TYPES: tuple[type[TurnStarted | TurnFinalized | MessageAppended], ...] = (
    TurnStarted,
    TurnFinalized,
    MessageAppended,
)
EVENT_ADAPTER: TypeAdapter[TurnStarted | TurnFinalized | MessageAppended] = TypeAdapter(Event)


class LegacyAppendV0(_Strict):
    """The legacy frontend's append body as the old route received it (schema_version 0)."""

    type: Literal["message.appended"]
    schema_version: Annotated[Literal[0], SchemaVersion]
    thread_id: Id64
    search_space_id: Id64
    user_id: Uuid | None = None
    turn_id: TurnId | None = None
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    token_usage: LegacyTokenUsage | None = None


class Rejection(BaseModel):
    """A record that cannot become an event; `detail` is short and never quotes chat text."""

    model_config = ConfigDict(frozen=True)
    reason: RejectReason
    detail: str
    # The type the record's JSON names, when it is one of ours: metrics label the dead letter
    # with it (events_total{type}) instead of "unknown".
    event_type: str | None = None


AnyEvent = TurnStarted | TurnFinalized | MessageAppended


def attribution(
    totals: Mapping[str, int], breakdown: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Per model, the measures of one usage row; what the breakdown does not cover (missing,
    partial or not adding up) is `(unattributed)`, so the models always sum to the totals."""
    shares: dict[str, dict[str, int]] = {}
    covered = dict.fromkeys(USAGE_MEASURES, 0)
    for model, entry in breakdown.items():
        # A dict (what JSON gives) first: the Mapping check alone costs an ABC lookup.
        is_mapping = isinstance(entry, dict | Mapping)
        share = {}
        for name in USAGE_MEASURES:
            value = entry.get(name) if is_mapping else None
            amount = value if isinstance(value, int) and not isinstance(value, bool) else 0
            share[name] = amount
            covered[name] += amount
        shares[model] = share
    rest = {name: totals[name] - covered[name] for name in USAGE_MEASURES}
    if any(rest.values()):
        # A breakdown may itself name "(unattributed)": the remainder adds to it.
        named = shares.get(UNATTRIBUTED, dict.fromkeys(USAGE_MEASURES, 0))
        shares[UNATTRIBUTED] = {name: named[name] + rest[name] for name in USAGE_MEASURES}
    return shares


def encode_event(event: AnyEvent) -> bytes:
    """The wire form of an event: compact UTF-8 JSON, fields in declaration order."""
    return jsonvalues.dumps(event.model_dump()).encode()
