"""The compiled decode path: a record's bytes straight to a LedgerEvent, for the shape producers
write (docs/contract.md#event-types). msgspec parses the JSON in C (non-integers as exact Decimals,
through the same range rule as producer/exact_json.py), and the checks below are the models'
rules (producer/events.py) written out for plain values, so no model is built.

It answers only when it is sure. Anything it does not know to be valid in the plain shape (a
rejection, a v0 legacy body, an upper-case UUID, a timestamp written another way, deep nesting,
a digit run past the number bound) is None, and the reference decoder (producer/decoding.py)
decides it, with its rejection reasons. tests/unit/producer/test_compiled.py holds the two
paths equal, field by field, on generated records and their mutations.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from producer import exact_json
from producer.events import (
    MAX_INT64,
    TOKEN_KINDS,
    USAGE_MEASURES,
    LegacyTokenUsage,
    MessageAppended,
    ModelUsage,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
)
from producer.ledger_event import LedgerEvent, from_payload

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
)
_EDGES = frozenset((datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)))
_ROLES = frozenset(("user", "assistant", "system"))
_FIELDS = {
    "turn.started": frozenset(TurnStarted.model_fields),
    "turn.finalized": frozenset(TurnFinalized.model_fields),
    "message.appended": frozenset(MessageAppended.model_fields),
}
_USAGE_FIELDS = frozenset(TurnUsage.model_fields)
_CALL_FIELDS = frozenset(UsageCall.model_fields)
_LEGACY_FIELDS = frozenset(LegacyTokenUsage.model_fields)
_ENTRY_FIELDS = frozenset(ModelUsage.model_fields)
_COUNTS = (*USAGE_MEASURES, *TOKEN_KINDS)


class _Unsure(Exception):  # noqa: N818 - control flow: the reference decoder decides
    pass


class _Numbers:
    """msgspec's hook for non-integers: exact, within the accepted range, and counting how much
    they grow the record when written out (exact_json.MAX_EXPANSION)."""

    def __init__(self) -> None:
        self.expansion = 0

    def __call__(self, text: str) -> Decimal:
        number = Decimal(text)
        if not exact_json.number_in_range(number):
            raise _Unsure
        self.expansion += max(0, exact_json.written_out(number) - len(text))
        return number


_NUMBERS = _Numbers()
_DECODER = msgspec.json.Decoder(float_hook=_NUMBERS)


def decode(value: bytes, max_bytes: int, max_nesting: int) -> tuple[LedgerEvent, int] | None:
    """The current-version event of a record value and how many of its fields this consumer
    does not know; None when the reference decoder must decide (see the module docstring).
    The future-skew check, which reads the record's timestamp, is the caller's."""
    if (
        not value
        or len(value) > max_bytes
        or b"\x00" in value
        or b"\\u0000" in value
        or value.count(b"[") + value.count(b"{") > max_nesting
        or exact_json.may_hold_a_long_integer(value)
    ):
        return None
    _NUMBERS.expansion = 0
    try:
        document = _DECODER.decode(value)
        if _NUMBERS.expansion > exact_json.MAX_EXPANSION or type(document) is not dict:
            return None
        payload, unknown = _event(document)
    except (_Unsure, msgspec.DecodeError, ArithmeticError, LookupError, ValueError):
        return None
    return from_payload(payload), unknown


def _event(document: dict[str, Any]) -> tuple[dict[str, Any], int]:
    kind = document.get("type")
    known = _FIELDS.get(kind) if type(kind) is str else None
    version = document.get("schema_version")
    if known is None or type(version) is not int or version != 1:
        raise _Unsure
    user_id = document["user_id"]  # required, may be null
    payload: dict[str, Any] = {
        "event_id": _uuid(document["event_id"]),
        "schema_version": 1,
        "occurred_at": _timestamp(document["occurred_at"]),
        "thread_id": _id64(document["thread_id"]),
        "search_space_id": _id64(document["search_space_id"]),
        "user_id": None if user_id is None else _uuid(user_id),
        "type": kind,
    }
    unknown = len(document.keys() - known)
    if kind == "turn.started":
        payload["turn_id"] = _turn_id(document["turn_id"])
        payload["user_query"] = _text(document["user_query"])
        if "mentioned_documents" in document:
            payload["mentioned_documents"] = _objects(document["mentioned_documents"])
    elif kind == "turn.finalized":
        payload["turn_id"] = _turn_id(document["turn_id"])
        payload["content"] = _content(document["content"])
        if "usage" in document:
            usage, extra = _usage(document["usage"], user_id is not None)
            payload["usage"] = usage
            unknown += extra
    else:
        if "turn_id" in document:
            turn_id = document["turn_id"]
            payload["turn_id"] = None if turn_id is None else _turn_id(turn_id)
        role = document["role"]
        if type(role) is not str or role not in _ROLES:
            raise _Unsure
        payload["role"] = role
        payload["content"] = _content(document["content"])
        if "token_usage" in document:
            legacy = document["token_usage"]
            if legacy is not None and role != "assistant":
                raise _Unsure
            payload["token_usage"], extra = (None, 0) if legacy is None else _legacy(legacy)
            unknown += extra
    return payload, unknown


def _uuid(value: Any) -> uuid.UUID:
    if type(value) is not str or not _UUID.fullmatch(value):
        raise _Unsure
    return uuid.UUID(value)


def _timestamp(value: Any) -> datetime:
    if type(value) is not str or not _TIMESTAMP.fullmatch(value):
        raise _Unsure
    at = datetime.fromisoformat(value).astimezone(UTC)
    if at in _EDGES:
        raise _Unsure
    return at


def _id64(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_INT64:
        raise _Unsure
    return value


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT64:
        raise _Unsure
    return value


def _text(value: Any, shortest: int = 0, longest: int | None = None) -> str:
    if type(value) is not str or len(value) < shortest:
        raise _Unsure
    if longest is not None and len(value) > longest:
        raise _Unsure
    return value


def _turn_id(value: Any) -> str:
    return _text(value, 1, 64)


def _objects(value: Any) -> list[dict[str, Any]]:
    if type(value) is not list or any(type(item) is not dict for item in value):
        raise _Unsure
    return value


def _content(value: Any) -> list[dict[str, Any]]:
    parts = _objects(value)
    for part in parts:
        if type(part.get("type")) is not str:
            raise _Unsure
    return parts


def _usage(value: Any, has_user: bool) -> tuple[dict[str, Any] | None, int]:
    if value is None:
        return None, 0
    if type(value) is not dict:
        raise _Unsure
    calls = _objects(value["calls"])
    if calls and not has_user:
        raise _Unsure  # usage calls need a user_id to bill: a rejection
    unknown = len(value.keys() - _USAGE_FIELDS)
    for call in calls:
        _text(call["model"], 1, 200)
        _text(call["call_kind"], 1, 64)
        for name in USAGE_MEASURES:
            _count(call[name])
        for kind in TOKEN_KINDS:
            if (reported := call.get(kind)) is not None:
                _count(reported)
        unknown += len(call.keys() - _CALL_FIELDS)
    if len(calls) > 1:
        for name in _COUNTS:
            if sum(call.get(name) or 0 for call in calls) > MAX_INT64:
                raise _Unsure
    return {"calls": calls}, unknown


def _legacy(value: Any) -> tuple[dict[str, Any], int]:
    if type(value) is not dict:
        raise _Unsure
    legacy = {name: _count(value[name]) for name in USAGE_MEASURES}
    unknown = len(value.keys() - _LEGACY_FIELDS)
    if "usage" in value:
        breakdown = value["usage"]
        if breakdown is not None:
            if type(breakdown) is not dict:
                raise _Unsure
            for entry in breakdown.values():
                if type(entry) is not dict:
                    raise _Unsure
                for name in USAGE_MEASURES:
                    if (measure := entry.get(name)) is not None:
                        _count(measure)
                unknown += len(entry.keys() - _ENTRY_FIELDS)
        legacy["usage"] = breakdown
    if "call_details" in value:
        details = value["call_details"]
        if details is not None and type(details) is not dict:
            _objects(details)
        legacy["call_details"] = details
    return legacy, unknown
