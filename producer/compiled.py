"""The compiled decode path: a record's bytes straight to a LedgerEvent, for the shape producers
write (docs/contract.md#event-types). msgspec validates the record in C against the models'
rules (producer/events.py) as msgspec types, and parses it once more into plain values (non-
integers as exact Decimals, through the same range rule as producer/exact_json.py) for what
is stored as sent; no model is built. The rules no type can say (sums within 2^63-1, usage
needs a user, token_usage on assistant messages only) are checked after.

It answers only when it is sure. Anything it does not know to be valid in the plain shape (a
rejection, a v0 legacy body, a UUID in braces, a timestamp written another way, deep nesting,
a digit run past the number bound, a call's count past 2^63-1 / 64) is None, and the reference
decoder (producer/decoding.py) decides it, with its rejection reasons. tests/unit/producer/test_compiled.py holds the two
paths equal, field by field, on generated records and their mutations.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from pydantic import BaseModel

from producer import exact_json
from producer.events import (
    MAX_INT64,
    TOKEN_KINDS,
    USAGE_MEASURES,
    ContentPart,
    LegacyTokenUsage,
    MessageAppended,
    ModelUsage,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
)
from producer.ledger_event import LedgerEvent, from_payload

MAX = MAX_INT64
Id64 = Annotated[int, Meta(ge=1, le=MAX)]
Count64 = Annotated[int, Meta(ge=0, le=MAX)]
TurnId = Annotated[str, Meta(min_length=1, max_length=64)]
# A call's count past MAX / CALLS is valid but no producer sends it: the reference decoder's.
# Below it, the sums over up to CALLS calls are within MAX without a pass over them.
CALLS = 64
CallCount = Annotated[int, Meta(ge=0, le=MAX // CALLS)]
# RFC 3339 as producers write it; anything else is for the reference decoder. \Z, not $: a
# pattern is searched, and $ would let a trailing newline through. Checked in `decode`, not as
# a msgspec constraint (which costs twice the search), and only for text not in the shape below.
_TIMESTAMP = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)\Z"
).search
# What `isoformat()` writes for a UTC time (no fraction when it is zero): text in this shape that
# parses is, character for character, its payload text, and within the pattern above.
_UTC_ISOFORMAT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.(?!000000)[0-9]{6})?\+00:00"
).fullmatch


# The models of producer/events.py as msgspec types, for validating in C. Fields a model keeps
# as sent (content parts, calls, breakdown entries) are checked here and taken from the parsed
# document, extra fields included; tests/unit/producer/test_compiled.py holds the field names
# to the models'.
class _Call(Struct):
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    prompt_tokens: CallCount
    completion_tokens: CallCount
    total_tokens: CallCount
    cost_micros: CallCount
    call_kind: Annotated[str, Meta(min_length=1, max_length=64)]
    cached_tokens: CallCount | None = None
    reasoning_tokens: CallCount | None = None


class _TurnUsage(Struct):
    calls: list[_Call]


class _ContentPart(Struct):
    type: str


class _ModelUsage(Struct):
    prompt_tokens: Count64 | None = None
    completion_tokens: Count64 | None = None
    total_tokens: Count64 | None = None
    cost_micros: Count64 | None = None


class _LegacyTokenUsage(Struct):
    prompt_tokens: Count64
    completion_tokens: Count64
    total_tokens: Count64
    cost_micros: Count64
    usage: dict[str, _ModelUsage] | UnsetType | None = UNSET
    call_details: list[dict[str, Any]] | dict[str, Any] | UnsetType | None = UNSET


class _Envelope(Struct, tag_field="type"):
    event_id: uuid.UUID
    schema_version: Literal[1]
    occurred_at: str  # _TIMESTAMP, in decode
    thread_id: Id64
    search_space_id: Id64
    user_id: uuid.UUID | None


class _TurnStarted(_Envelope, tag="turn.started"):
    turn_id: TurnId
    user_query: str
    mentioned_documents: list[dict[str, Any]] | UnsetType = UNSET


class _TurnFinalized(_Envelope, tag="turn.finalized"):
    turn_id: TurnId
    content: list[_ContentPart]
    usage: _TurnUsage | UnsetType | None = UNSET


class _MessageAppended(_Envelope, tag="message.appended"):
    role: Literal["user", "assistant", "system"]
    content: list[_ContentPart]
    turn_id: TurnId | UnsetType | None = UNSET
    token_usage: _LegacyTokenUsage | UnsetType | None = UNSET


STRUCTS: dict[type[BaseModel], type[Struct]] = {
    TurnStarted: _TurnStarted,
    TurnFinalized: _TurnFinalized,
    MessageAppended: _MessageAppended,
    TurnUsage: _TurnUsage,
    UsageCall: _Call,
    ContentPart: _ContentPart,
    ModelUsage: _ModelUsage,
    LegacyTokenUsage: _LegacyTokenUsage,
}
_STARTED = frozenset(TurnStarted.model_fields)
_FINALIZED = frozenset(TurnFinalized.model_fields)
_APPENDED = frozenset(MessageAppended.model_fields)
_USAGE_FIELDS = frozenset(TurnUsage.model_fields)
_CALL_FIELDS = frozenset(UsageCall.model_fields)
_LEGACY_FIELDS = frozenset(LegacyTokenUsage.model_fields)
_ENTRY_FIELDS = frozenset(ModelUsage.model_fields)
_COUNTS = (*USAGE_MEASURES, *TOKEN_KINDS)
_EDGES = frozenset((datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)))


class _Numbers:
    """msgspec's hook for non-integers of the untyped parse: exact, within the accepted range,
    counting how much they grow the record when written out (exact_json.MAX_EXPANSION)."""

    def __init__(self) -> None:
        self.expansion = 0

    def __call__(self, text: str) -> Decimal:
        number = Decimal(text)
        if not exact_json.number_in_range(number):
            raise ValueError("out of range")
        self.expansion += max(0, exact_json.written_out(number) - len(text))
        return number


_NUMBERS = _Numbers()
_PARSE = msgspec.json.Decoder(float_hook=_NUMBERS)
_VALIDATE = msgspec.json.Decoder(_TurnStarted | _TurnFinalized | _MessageAppended)


def decode(value: bytes, max_bytes: int, max_nesting: int) -> tuple[LedgerEvent, int] | None:
    """The current-version event of a record value and how many of its fields this consumer
    does not know; None when the reference decoder must decide (see the module docstring).
    The future-skew check, which reads the record's timestamp, is the caller's."""
    # An int operand of `in` is a memchr; a bytes one first fails as an int, raising and
    # clearing a TypeError. `\u0000` needs a backslash, and a digit run longer than the
    # bound a text longer than it.
    if (
        not value
        or len(value) > max_bytes
        or 0 in value
        or (0x5C in value and b"\\u0000" in value)
        or value.count(b"[") + value.count(b"{") > max_nesting
        or (len(value) > exact_json.MAX_NUMBER_DIGITS and exact_json.may_hold_a_long_integer(value))
    ):
        return None
    _NUMBERS.expansion = 0
    try:
        event = _VALIDATE.decode(value)
        document = _PARSE.decode(value)
    except (msgspec.DecodeError, ValueError, ArithmeticError):
        return None
    if _NUMBERS.expansion > exact_json.MAX_EXPANSION:
        return None
    written = event.occurred_at
    as_isoformat = _UTC_ISOFORMAT(written) is not None
    if not as_isoformat and _TIMESTAMP(written) is None:
        return None
    try:
        occurred_at = datetime.fromisoformat(written).astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if occurred_at in _EDGES:
        return None
    found: tuple[dict[str, Any], int] | None
    if isinstance(event, _TurnStarted):
        found, event_type, fields = _started(event, document), "turn.started", _STARTED
    elif isinstance(event, _TurnFinalized):
        found, event_type, fields = _finalized(event, document), "turn.finalized", _FINALIZED
    else:
        found, event_type, fields = _appended(event, document), "message.appended", _APPENDED
    if found is None:
        return None
    payload, unknown = found
    payload["event_id"] = event.event_id
    payload["schema_version"] = 1
    payload["occurred_at"] = written if as_isoformat else occurred_at.isoformat()
    payload["thread_id"] = event.thread_id
    payload["search_space_id"] = event.search_space_id
    payload["user_id"] = event.user_id
    payload["type"] = event_type
    # A set is made of the keys only when one is not a field: most records hold none.
    if not fields.issuperset(document):
        unknown += len(document.keys() - fields)
    return from_payload(payload, occurred_at), unknown


def _started(event: _TurnStarted, document: dict[str, Any]) -> tuple[dict[str, Any], int]:
    payload: dict[str, Any] = {"turn_id": event.turn_id, "user_query": event.user_query}
    if event.mentioned_documents is not UNSET:
        payload["mentioned_documents"] = document["mentioned_documents"]
    return payload, 0


def _finalized(
    event: _TurnFinalized, document: dict[str, Any]
) -> tuple[dict[str, Any], int] | None:
    payload: dict[str, Any] = {"turn_id": event.turn_id, "content": document["content"]}
    unknown = 0
    if event.usage is not UNSET:
        payload["usage"] = None
        if event.usage is not None:
            calls = event.usage.calls
            if calls and event.user_id is None:
                return None  # usage calls need a user_id to bill: a rejection
            if len(calls) > CALLS:
                for name in _COUNTS:
                    if sum(getattr(call, name) or 0 for call in calls) > MAX:
                        return None
            usage = document["usage"]
            sent = usage["calls"]
            if not _USAGE_FIELDS.issuperset(usage):
                unknown = len(usage.keys() - _USAGE_FIELDS)
            if not all(map(_CALL_FIELDS.issuperset, sent)):
                unknown += sum(len(call.keys() - _CALL_FIELDS) for call in sent)
            payload["usage"] = {"calls": sent}
    return payload, unknown


def _appended(
    event: _MessageAppended, document: dict[str, Any]
) -> tuple[dict[str, Any], int] | None:
    payload: dict[str, Any] = {"role": event.role, "content": document["content"]}
    if event.turn_id is not UNSET:
        payload["turn_id"] = event.turn_id
    unknown = 0
    if event.token_usage is not UNSET:
        legacy = event.token_usage
        payload["token_usage"] = None
        if legacy is not None:
            if event.role != "assistant":
                return None  # token_usage on a user or system message: a rejection
            sent = document["token_usage"]
            kept = {name: sent[name] for name in USAGE_MEASURES}
            if not _LEGACY_FIELDS.issuperset(sent):
                unknown = len(sent.keys() - _LEGACY_FIELDS)
            if legacy.usage is not UNSET:
                kept["usage"] = entries = sent["usage"]
                if entries is not None and not all(map(_ENTRY_FIELDS.issuperset, entries.values())):
                    unknown += sum(len(e.keys() - _ENTRY_FIELDS) for e in entries.values())
            if legacy.call_details is not UNSET:
                kept["call_details"] = sent["call_details"]
            payload["token_usage"] = kept
    return payload, unknown
