"""The event contract: envelope, the three event types, and the one decoder from Kafka bytes.

Every event on `chat.turn-events` is UTF-8 JSON with a common envelope (event_id, type,
schema_version, occurred_at, thread_id, search_space_id, user_id, turn_id). `decode_event`
turns a record value into either a validated, current-version event or a `Rejection` whose
`reason` is one of `RejectReason` and whose `detail` never quotes chat text.

Schema versions: 1 is current. Version 0 is the legacy frontend's append body, upcast here to
v1 (deterministic event_id, occurred_at = record timestamp). Newer versions are rejected.

Forward compatibility (SPEC section 2): a field this consumer does not know is accepted. Inside
a content part, a usage call or a legacy per-model breakdown it is kept (stored as sent);
elsewhere it is ignored. Either way it is counted (`BatchDecoder.unknown_fields`). Numbers are parsed
exactly (non-integers as Decimal), `NaN`/`Infinity` are not JSON, and `occurred_at` is
normalised to UTC here, so no later comparison can overflow.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
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
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from producer import jsonvalues

CURRENT_SCHEMA_VERSION = 1
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
MAX_INT64 = 2**63 - 1
# Fixed namespace for the event_id of upcast v0 bodies: identical re-sends get identical ids.
LEGACY_EVENT_NAMESPACE = uuid.UUID("6f1d8a52-4a8e-5c2b-9d0e-7b3f2a9c4e11")

DEFAULT_MAX_FUTURE_SKEW = timedelta(hours=1)
USAGE_MEASURES = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")
# The share of a usage row's totals that its per-model breakdown does not cover (SPEC §7).
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

    def call_details_object(self) -> dict[str, Any]:
        """`call_details` as stored: a bare list is normalised to {"calls": [...]}."""
        if self.call_details is None:
            return {"calls": []}
        if isinstance(self.call_details, list):
            return {"calls": self.call_details}
        return self.call_details


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

# A JSON string can only carry U+0000 as the escape \u0000 (raw control bytes are invalid JSON);
# an even run of backslashes before it is an escaped backslash followed by literal text.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_SAFE_CONTEXT = ("expected", "ge", "le", "min_length", "max_length", "discriminator")
# Parser messages give a position, and our own validators' messages are fixed text; other
# errors' `error` context (e.g. uuid_parsing) quotes the input, so it is left out.
_ERROR_TEXT_SAFE = frozenset(("json_invalid", "value_error"))
_DETAIL_LIMIT = 400
_KNOWN_TYPES = frozenset(("turn.started", "turn.finalized", "message.appended"))
# The numbers the ledger accepts anywhere in an event: at most MAX_NUMBER_DIGITS digits before
# the point and as many after it, once the exponent is applied. PostgreSQL stores jsonb numbers
# as numeric and prints them in full (`1e4400` as a 4,401-digit integer), and Python reads an
# integer of at most 4,300 digits (sys.get_int_max_str_digits): this bound leaves room for
# every path that reads stored numbers back and sums them (verify, the relay, usage).
MAX_NUMBER_DIGITS = 1000
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
_INTEGER_BOUND: int = 10**MAX_NUMBER_DIGITS
# Deeper JSON is refused (the pydantic parser used before refused past ~200): everything after
# the decoder may walk a value recursively, and Python's stack is ~1000 frames.
MAX_NESTING = 128


class _NotJsonError(ValueError):
    pass


class _NumberOutOfRangeError(ValueError):
    pass


def number_in_range(number: int | Decimal) -> bool:
    """Whether every path can store, read back and sum `number` (see MAX_NUMBER_DIGITS)."""
    if isinstance(number, int):
        return -_INTEGER_BOUND < number < _INTEGER_BOUND
    exponent = number.as_tuple().exponent
    return (
        isinstance(exponent, int)
        and number.adjusted() < MAX_NUMBER_DIGITS
        and -exponent <= MAX_NUMBER_DIGITS
    )


def _exact_number(text: str) -> Decimal:
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the JSON scanner only passes numbers
        raise _NotJsonError(f"bad number at {text[:20]!r}") from None
    if not number_in_range(number):
        raise _NumberOutOfRangeError
    return number


def _not_a_number(token: str) -> Any:
    raise _NotJsonError(f"{token} is not JSON")


# One decoder for every record: json.loads with hooks would build a new one per call.
_DECODER = json.JSONDecoder(parse_float=_exact_number, parse_constant=_not_a_number)


def _parse(text: str) -> Any:
    if text.startswith("\ufeff"):  # what json.loads refuses before decoding
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def decode_event(
    value: bytes | None,
    *,
    timestamp_ms: int | None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    max_future_skew: timedelta | None = DEFAULT_MAX_FUTURE_SKEW,
) -> AnyEvent | Rejection:
    """Validate a record value into a current-version event, or reject it. Never raises."""
    result, _, _ = _decode_value(value, timestamp_ms, max_bytes)
    return _within_skew(result, timestamp_ms, max_future_skew)


class BatchDecoder:
    """decode_event for the records of one batch: a value seen before in the batch (a
    redelivery, a producer's retry) is not parsed and validated again when its event cannot
    depend on the record's timestamp (a current-version event: only the future-skew check
    reads the timestamp, and it runs for every record). An upcast v0 body takes occurred_at
    from its record, and a rejection is not kept: both are decoded every time.

    `unknown_fields`: per event type, the fields of the decoded records that this consumer
    does not know (each record counts, repeats too; rejected records do not)."""

    def __init__(self, *, max_bytes: int, max_future_skew: timedelta | None) -> None:
        self.max_bytes = max_bytes
        self.max_future_skew = max_future_skew
        self.unknown_fields: dict[str, int] = {}
        self._seen: dict[bytes, tuple[AnyEvent, int]] = {}

    def __call__(self, value: bytes | None, timestamp_ms: int | None) -> AnyEvent | Rejection:
        seen = self._seen.get(value) if value else None
        if seen is None:
            result, timeless, unknown = _decode_value(value, timestamp_ms, self.max_bytes)
            if timeless and value and not isinstance(result, Rejection):
                self._seen[value] = (result, unknown)
        else:
            result, unknown = seen
        result = _within_skew(result, timestamp_ms, self.max_future_skew)
        if unknown and not isinstance(result, Rejection):
            self.unknown_fields[result.type] = self.unknown_fields.get(result.type, 0) + unknown
        return result


def _decode_value(
    value: bytes | None, timestamp_ms: int | None, max_bytes: int
) -> tuple[AnyEvent | Rejection, bool, int]:
    """The record's event or rejection before the future-skew check, whether it is the same
    whatever the record's timestamp, and how many of its fields this consumer does not know."""
    try:
        return _decode(value, timestamp_ms, max_bytes)
    except RecursionError:  # the nesting limit should make this unreachable; never crash on it
        return Rejection(reason=RejectReason.INVALID_JSON, detail="nested too deep"), False, 0


def _within_skew(
    result: AnyEvent | Rejection, timestamp_ms: int | None, max_future_skew: timedelta | None
) -> AnyEvent | Rejection:
    if isinstance(result, Rejection) or max_future_skew is None:
        return result
    if timestamp_ms is not None and timestamp_ms >= 0:
        record_time = _record_time(timestamp_ms)
        if record_time is not None and result.occurred_at - record_time > max_future_skew:
            return Rejection(
                reason=RejectReason.OCCURRED_AT_IN_FUTURE,
                detail=f"occurred_at is {(result.occurred_at - record_time).total_seconds():.0f}s"
                f" ahead of the record timestamp (limit {max_future_skew.total_seconds():.0f}s)",
                event_type=result.type,
            )
    return result


def _decode(
    value: bytes | None, timestamp_ms: int | None, max_bytes: int
) -> tuple[AnyEvent | Rejection, bool, int]:
    rejected = _screen(value, max_bytes)
    if rejected is not None:
        return rejected, False, 0
    assert value is not None  # screened
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"invalid byte at {exc.start}"
        return Rejection(reason=RejectReason.INVALID_UTF8, detail=detail), False, 0
    if _LONG_DIGIT_RUN.search(value) and (rejected := _out_of_range(text)) is not None:
        return rejected, False, 0  # before parsing: a long integer costs quadratic time
    try:
        document = _parse(text)
    except _NumberOutOfRangeError:
        rejected = _out_of_range(text)
        assert rejected is not None  # the same text, parsed again
        return rejected, False, 0
    except _NotJsonError as exc:
        return Rejection(reason=RejectReason.INVALID_JSON, detail=str(exc)), False, 0
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        return Rejection(reason=RejectReason.INVALID_JSON, detail=detail), False, 0
    except (ValueError, RecursionError) as exc:  # an integer past 4300 digits, deep nesting
        return Rejection(reason=RejectReason.INVALID_JSON, detail=type(exc).__name__), False, 0
    event_type = _known_type(document)
    if value.count(b"[") + value.count(b"{") > MAX_NESTING and _nesting(document) > MAX_NESTING:
        return (
            Rejection(
                reason=RejectReason.INVALID_JSON,
                detail=f"nested deeper than {MAX_NESTING} levels",
                event_type=event_type,
            ),
            False,
            0,
        )
    if (b"\\ud" in value or b"\\uD" in value) and _has_lone_surrogate(document):
        return (
            Rejection(
                reason=RejectReason.INVALID_JSON,
                detail="a \\u escape names a lone UTF-16 surrogate",
                event_type=event_type,
            ),
            False,
            0,
        )
    result = _validate(document, timestamp_ms)
    if isinstance(result, Rejection):
        return result.model_copy(update={"event_type": event_type}), False, 0
    # An upcast v0 body's occurred_at is its record's timestamp.
    timeless = document.get("schema_version") != 0
    return result, timeless, _count_unknown(result, document)


def _screen(value: bytes | None, max_bytes: int) -> Rejection | None:
    """What is wrong with the bytes before they are decoded, if anything."""
    if value is None or len(value) == 0:
        return Rejection(reason=RejectReason.EMPTY_VALUE, detail="record has no value")
    if len(value) > max_bytes:
        return Rejection(
            reason=RejectReason.TOO_LARGE, detail=f"{len(value)} bytes > limit {max_bytes}"
        )
    if b"\x00" in value or (b"\\u0000" in value and _NUL_ESCAPE.search(value)):
        return Rejection(reason=RejectReason.NUL_CHARACTER, detail="U+0000 in the JSON text")
    return None


class _OutOfRange:
    """Where a number outside the accepted range stood (found by `_out_of_range`)."""


_OUT_OF_RANGE = _OutOfRange()


def _located_int(text: str) -> int | _OutOfRange:
    digits = len(text) - text.startswith("-")
    return _OUT_OF_RANGE if digits > MAX_NUMBER_DIGITS else int(text)


def _located_float(text: str) -> Decimal | _OutOfRange:
    number = Decimal(text)
    return number if number_in_range(number) else _OUT_OF_RANGE


_LOCATING_DECODER = json.JSONDecoder(
    parse_int=_located_int, parse_float=_located_float, parse_constant=_not_a_number
)


def _out_of_range(text: str) -> Rejection | None:
    """The rejection naming the first number outside the accepted range, if there is one."""
    try:
        document = _LOCATING_DECODER.decode(text)
    except ValueError as exc:  # not JSON at all: say so as the plain parse does
        detail = (
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else str(exc)
        )
        return Rejection(reason=RejectReason.INVALID_JSON, detail=detail[:_DETAIL_LIMIT])
    stack: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if value is _OUT_OF_RANGE:
            where = ".".join(path) or "<root>"
            return Rejection(
                reason=RejectReason.SCHEMA_INVALID,
                detail=f"{where}: number out of range (at most {MAX_NUMBER_DIGITS} digits"
                " before and after the point)"[:_DETAIL_LIMIT],
                event_type=_known_type(document),
            )
        if isinstance(value, dict):
            stack.extend((v, (*path, str(k)[:64])) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in reversed(list(enumerate(value))))
    return None


def _nesting(document: Any) -> int:
    """The deepest nesting of arrays and objects (a loop, not recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            inner = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in inner if isinstance(item, dict | list))
    return deepest


def _known_type(document: Any) -> str | None:
    kind = document.get("type") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) and kind in _KNOWN_TYPES else None


def _has_lone_surrogate(document: Any) -> bool:
    try:
        jsonvalues.dumps(document).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _record_time(timestamp_ms: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _validate(document: Any, timestamp_ms: int | None) -> AnyEvent | Rejection:
    try:
        return EVENT_ADAPTER.validate_python(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    if not isinstance(document, dict):
        return Rejection(reason=RejectReason.SCHEMA_INVALID, detail="<root>: expected an object")
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        version = None
    if version is not None and version > CURRENT_SCHEMA_VERSION:
        return Rejection(
            reason=RejectReason.UNSUPPORTED_VERSION,
            detail=f"schema_version {version} > {CURRENT_SCHEMA_VERSION}",
        )
    event_type = document.get("type")
    if isinstance(event_type, str) and event_type not in _KNOWN_TYPES:
        return Rejection(reason=RejectReason.UNKNOWN_TYPE, detail=f"type {event_type[:64]!r}")
    if version == 0:
        return _upcast_v0(document, timestamp_ms)
    return Rejection(reason=RejectReason.SCHEMA_INVALID, detail=_describe(errors))


def _upcast_v0(document: dict[str, Any], timestamp_ms: int | None) -> AnyEvent | Rejection:
    try:
        legacy = LegacyAppendV0.model_validate(document)
    except ValidationError as exc:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail="v0: " + _describe(exc.errors(include_url=False, include_input=False)),
        )
    record_time = (
        _record_time(timestamp_ms) if timestamp_ms is not None and timestamp_ms >= 0 else None
    )
    if record_time is None:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail="v0 body needs a record timestamp within years 1..9999 for occurred_at",
        )
    upcast = {
        **{name: document[name] for name in legacy.model_fields_set},
        "schema_version": CURRENT_SCHEMA_VERSION,
        "event_id": str(v0_event_id(document)),
        "occurred_at": record_time,
    }
    try:
        event = EVENT_ADAPTER.validate_python(upcast)
    except ValidationError as exc:
        return Rejection(
            reason=RejectReason.SCHEMA_INVALID,
            detail="v0: " + _describe(exc.errors(include_url=False, include_input=False)),
        )
    assert isinstance(event, MessageAppended)
    return event


def v0_event_id(document: dict[str, Any]) -> uuid.UUID:
    """uuid5 over the body's canonical JSON: identical re-sends get identical ids.

    The canonical text is the one every release so far used (floats through `repr`, ASCII
    escapes), so a replay after an upgrade finds the rows it created before."""
    canonical = json.dumps(
        _as_floats(document), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return uuid.uuid5(LEGACY_EVENT_NAMESPACE, canonical)


def _as_floats(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_floats(v) for v in value]
    return value


_FIELDS: dict[str, frozenset[str]] = {
    "turn.started": frozenset(TurnStarted.model_fields),
    "turn.finalized": frozenset(TurnFinalized.model_fields),
    "message.appended": frozenset(MessageAppended.model_fields),
}
_V0_FIELDS = frozenset(LegacyAppendV0.model_fields)
_LEGACY_USAGE_FIELDS = frozenset(LegacyTokenUsage.model_fields)
_TURN_USAGE_FIELDS = frozenset(TurnUsage.model_fields)


def _count_unknown(event: AnyEvent, document: dict[str, Any]) -> int:
    """Fields of the record that this consumer does not know, wherever they are."""
    known = _V0_FIELDS if document.get("schema_version") == 0 else _FIELDS[event.type]
    count = len(document.keys() - known)
    if isinstance(event, TurnFinalized) and event.usage is not None:
        count += len(document["usage"].keys() - _TURN_USAGE_FIELDS)
        count += sum(len(call.model_extra or ()) for call in event.usage.calls)
    if isinstance(event, MessageAppended) and event.token_usage is not None:
        count += len(document["token_usage"].keys() - _LEGACY_USAGE_FIELDS)
        count += sum(
            len(entry.model_extra or ()) for entry in (event.token_usage.usage or {}).values()
        )
    return count


def attribution(
    totals: Mapping[str, int], breakdown: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Per model, the measures of one usage row; what the breakdown does not cover (missing,
    partial or not adding up) is `(unattributed)`, so the models always sum to the totals."""
    shares: dict[str, dict[str, int]] = {}
    covered = dict.fromkeys(USAGE_MEASURES, 0)
    for model, entry in breakdown.items():
        share = {}
        for name in USAGE_MEASURES:
            value = entry.get(name) if isinstance(entry, Mapping) else None
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


def payload(event: AnyEvent) -> dict[str, Any]:
    """The event as the ledger sees it. exclude_unset: what the ledger stores (e.g. a legacy
    breakdown entry as sent), so copies that would store differently never share a digest."""
    return event.model_dump(exclude_unset=True)


def payload_digest(event: AnyEvent, dumped: Mapping[str, Any] | None = None) -> bytes:
    """SHA-256 of the event's `payload` (pass it when already dumped): what orders differing
    copies of one event_id (SPEC section 3 "Identity"); exact copies have equal digests."""
    text = jsonvalues.dumps(
        payload(event) if dumped is None else dumped, sort_keys=True, ensure_ascii=True
    )
    return hashlib.sha256(text.encode("ascii")).digest()


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
    return jsonvalues.dumps(event.model_dump()).encode()
