"""The event contract: envelope, the three event types, and the one decoder from Kafka bytes.

Every event on `chat.turn-events` is UTF-8 JSON with a common envelope (event_id, type,
schema_version, occurred_at, thread_id, search_space_id, user_id, turn_id). `decode_event`
turns a record value into either a validated, current-version event or a `Rejection` whose
`reason` is one of `RejectReason` and whose `detail` never quotes chat text.

Schema versions: 1 is current. Version 0 is the legacy frontend's append body, upcast here to
v1 (deterministic event_id, occurred_at = record timestamp). Newer versions are rejected.
Unknown fields are rejected too: additions to the contract come with a new schema_version.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

CURRENT_SCHEMA_VERSION = 1
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
MAX_INT64 = 2**63 - 1
# Fixed namespace for the event_id of upcast v0 bodies: identical re-sends get identical ids.
LEGACY_EVENT_NAMESPACE = uuid.UUID("6f1d8a52-4a8e-5c2b-9d0e-7b3f2a9c4e11")

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
    THREAD_SEARCH_SPACE_MISMATCH = "thread_search_space_mismatch"
    DATABASE_REJECTED = "database_rejected"  # SQLSTATE class 22/23 isolated to this record


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ContentPart(BaseModel):
    """One part of a message's content: any JSON object with a string `type`."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    type: str


class UsageCall(_Strict):
    model: str = Field(min_length=1, max_length=200)
    prompt_tokens: Count64
    completion_tokens: Count64
    total_tokens: Count64
    cost_micros: Count64
    call_kind: str = Field(min_length=1, max_length=64)


class TurnUsage(_Strict):
    calls: list[UsageCall]

    @model_validator(mode="after")
    def _sums_fit_bigint(self) -> Self:
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros"):
            if sum(getattr(call, name) for call in self.calls) > MAX_INT64:
                raise ValueError(f"sum of {name} over the calls exceeds 2^63-1")
        return self


class ModelUsage(_Strict):
    prompt_tokens: Count64
    completion_tokens: Count64
    total_tokens: Count64
    cost_micros: Count64


class LegacyTokenUsage(_Strict):
    """`token_usage` of message.appended: totals, per-model `usage`, free-form `call_details`."""

    prompt_tokens: Count64
    completion_tokens: Count64
    total_tokens: Count64
    cost_micros: Count64
    usage: dict[str, ModelUsage] | None = None
    call_details: list[dict[str, Any]] | dict[str, Any] | None = None

    def call_details_object(self) -> dict[str, Any]:
        """`call_details` as stored: a bare list is normalised to {"calls": [...]}."""
        if self.call_details is None:
            return {"calls": []}
        if isinstance(self.call_details, list):
            return {"calls": self.call_details}
        return self.call_details


class _Envelope(_Strict):
    event_id: uuid.UUID
    schema_version: Literal[1]
    occurred_at: AwareDatetime
    thread_id: Id64
    search_space_id: Id64
    user_id: uuid.UUID | None


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
    schema_version: Literal[0]
    thread_id: Id64
    search_space_id: Id64
    user_id: uuid.UUID | None = None
    turn_id: TurnId | None = None
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    token_usage: LegacyTokenUsage | None = None


class _Header(BaseModel):
    """Just the routing fields, read only when a record failed the v1 models."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str | None = None
    schema_version: int | None = None


class Rejection(BaseModel):
    """A record that cannot become an event; `detail` is short and never quotes chat text."""

    model_config = ConfigDict(frozen=True)
    reason: RejectReason
    detail: str


AnyEvent = TurnStarted | TurnFinalized | MessageAppended

# A JSON string can only carry U+0000 as the escape \u0000 (raw control bytes are invalid JSON);
# an even run of backslashes before it is an escaped backslash followed by literal text.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_SAFE_CONTEXT = ("expected", "ge", "le", "min_length", "max_length", "discriminator")
# Parser messages give a position, and our own validators' messages are fixed text; other
# errors' `error` context (e.g. uuid_parsing) quotes the input, so it is left out.
_ERROR_TEXT_SAFE = frozenset(("json_invalid", "value_error"))
_DETAIL_LIMIT = 400


def decode_event(
    value: bytes | None,
    *,
    timestamp_ms: int | None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> AnyEvent | Rejection:
    """Validate a record value straight from bytes into a current-version event, or reject it."""
    if value is None or len(value) == 0:
        return Rejection(reason=RejectReason.EMPTY_VALUE, detail="record has no value")
    if len(value) > max_bytes:
        return Rejection(
            reason=RejectReason.TOO_LARGE, detail=f"{len(value)} bytes > limit {max_bytes}"
        )
    if b"\x00" in value or _NUL_ESCAPE.search(value):
        return Rejection(reason=RejectReason.NUL_CHARACTER, detail="U+0000 in the JSON text")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(reason=RejectReason.INVALID_UTF8, detail=f"invalid byte at {exc.start}")
    try:
        return EVENT_ADAPTER.validate_json(value)
    except ValidationError as exc:
        return _classify(value, exc, timestamp_ms, max_bytes)


def _classify(
    value: bytes, error: ValidationError, timestamp_ms: int | None, max_bytes: int
) -> AnyEvent | Rejection:
    errors = error.errors(include_url=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        return Rejection(reason=RejectReason.INVALID_JSON, detail=_describe(errors))
    try:
        header = _Header.model_validate_json(value)
    except ValidationError as header_error:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail=_describe(header_error.errors(include_url=False, include_input=False)),
        )
    version = header.schema_version
    if version is not None and version > CURRENT_SCHEMA_VERSION:
        return Rejection(
            reason=RejectReason.UNSUPPORTED_VERSION,
            detail=f"schema_version {version} > {CURRENT_SCHEMA_VERSION}",
        )
    if header.type is not None and header.type not in _KNOWN_TYPES:
        return Rejection(reason=RejectReason.UNKNOWN_TYPE, detail=f"type {header.type[:64]!r}")
    if version == 0:
        return _upcast_v0(value, timestamp_ms, max_bytes)
    return Rejection(reason=RejectReason.SCHEMA_INVALID, detail=_describe(errors))


_KNOWN_TYPES = frozenset(("turn.started", "turn.finalized", "message.appended"))


def _upcast_v0(value: bytes, timestamp_ms: int | None, max_bytes: int) -> AnyEvent | Rejection:
    try:
        legacy = LegacyAppendV0.model_validate_json(value)
    except ValidationError as exc:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail="v0: " + _describe(exc.errors(include_url=False, include_input=False)),
        )
    if timestamp_ms is None or timestamp_ms < 0:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail="v0 body needs the record timestamp for occurred_at",
        )
    body = legacy.model_dump(mode="json", exclude_unset=True)
    canonical = json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
    upcast = {
        **body,
        "schema_version": CURRENT_SCHEMA_VERSION,
        "event_id": str(uuid.uuid5(LEGACY_EVENT_NAMESPACE, canonical)),
        "occurred_at": datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).isoformat(),
    }
    try:
        return EVENT_ADAPTER.validate_json(json.dumps(upcast))
    except ValidationError as exc:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail="v0: " + _describe(exc.errors(include_url=False, include_input=False)),
        )


def _describe(errors: list[ErrorDetails]) -> str:
    """`location: error_type (schema context)` for each error, built from the schema side only."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        ctx: Mapping[str, Any] = err.get("ctx") or {}
        shown = ", ".join(f"{k}={ctx[k]}" for k in _SAFE_CONTEXT if k in ctx)
        if err["type"] in _ERROR_TEXT_SAFE and "error" in ctx:
            shown = str(ctx["error"])
        parts.append(f"{loc}: {err['type']}" + (f" ({shown})" if shown else ""))
    if len(errors) > 5:
        parts.append(f"... {len(errors) - 5} more")
    return "; ".join(parts)[:_DETAIL_LIMIT]


def encode_event(event: AnyEvent) -> bytes:
    """The wire form of an event: compact UTF-8 JSON, fields in declaration order."""
    return event.model_dump_json().encode()
