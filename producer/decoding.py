"""The one decoder from Kafka bytes to events (docs/contract.md#limits-and-dead-letters).

`decode_event` turns a record value into either a validated, current-version event
(producer/events.py) or a `Rejection` whose `reason` is one of `RejectReason` and whose `detail`
never quotes chat text. In order: the bytes are screened (empty, too large, U+0000), decoded as
UTF-8, parsed with exact numbers within the accepted range (producer/exact_json.py), checked
for nesting and lone surrogates, validated by the models; a v0 legacy body is upcast to v1
(deterministic event_id, occurred_at = the record's timestamp). Fields this consumer does not
know are counted. The consumer decodes through consumer/ledger/decode.py: a native path
(consumer/ledger/native.py) first, this decoder for whatever that path is not sure of.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from producer import exact_json, jsonvalues
from producer.events import (
    CURRENT_SCHEMA_VERSION,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_FUTURE_SKEW,
    EVENT_ADAPTER,
    LEGACY_EVENT_NAMESPACE,
    AnyEvent,
    LegacyAppendV0,
    LegacyTokenUsage,
    MessageAppended,
    Rejection,
    RejectReason,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
)
from producer.ledger_event import LedgerEvent

# A JSON string can only carry U+0000 as the escape \u0000 (raw control bytes are invalid JSON);
# an even run of backslashes before it is an escaped backslash followed by literal text.
log = logging.getLogger(__name__)
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_SAFE_CONTEXT = ("expected", "ge", "le", "min_length", "max_length", "discriminator")
# Parser messages give a position, and our own validators' messages are fixed text; other
# errors' `error` context (e.g. uuid_parsing) quotes the input, so it is left out.
_ERROR_TEXT_SAFE = frozenset(("json_invalid", "value_error"))
_DETAIL_LIMIT = 400
_KNOWN_TYPES = frozenset(("turn.started", "turn.finalized", "message.appended"))
# Deeper JSON is refused (the pydantic parser used before refused past ~200): everything after
# the decoder may walk a value recursively, and Python's stack is ~1000 frames.
MAX_NESTING = 128
_Decoded = TypeVar("_Decoded", AnyEvent | Rejection, LedgerEvent | Rejection)


def decode_event(
    value: bytes | None,
    *,
    timestamp_ms: int | None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    max_future_skew: timedelta | None = DEFAULT_MAX_FUTURE_SKEW,
) -> AnyEvent | Rejection:
    """Validate a record value into a current-version event, or reject it. Never raises."""
    result, _, _ = decode_value(value, timestamp_ms, max_bytes)
    return within_skew(result, timestamp_ms, max_future_skew)


def decode_value(
    value: bytes | None, timestamp_ms: int | None, max_bytes: int
) -> tuple[AnyEvent | Rejection, bool, int]:
    """The record's event or rejection before the future-skew check, whether it is the same
    whatever the record's timestamp, and how many of its fields this consumer does not know."""
    try:
        return _decode(value, timestamp_ms, max_bytes)
    except RecursionError:  # the nesting limit should make this unreachable; never crash on it
        return Rejection(reason=RejectReason.INVALID_JSON, detail="nested too deep"), False, 0
    except Exception as error:  # a bug here must cost one dead letter, not the consumer
        log.exception("the decoder failed on a record", extra={"error": type(error).__name__})
        detail = f"the decoder failed on this record ({type(error).__name__}): see the log"
        return Rejection(reason=RejectReason.SCHEMA_INVALID, detail=detail), False, 0


def within_skew(
    result: _Decoded, timestamp_ms: int | None, max_future_skew: timedelta | None
) -> _Decoded:
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
    if exact_json.may_hold_a_long_integer(value) and (rejected := _out_of_range(text)):
        return rejected, False, 0  # before parsing: a long integer costs quadratic time
    try:
        document = exact_json.parse(text)
    except exact_json.NumberOutOfRangeError:
        located = _out_of_range(text)  # parsed again, to say where
        return located or _out_of_range_somewhere(), False, 0
    except exact_json.NumbersTooLongError as exc:
        return Rejection(reason=RejectReason.SCHEMA_INVALID, detail=str(exc)), False, 0
    except exact_json.NotJsonError as exc:
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


def _out_of_range(text: str) -> Rejection | None:
    """The rejection naming the first number outside the accepted range, if there is one."""
    try:
        found = exact_json.out_of_range_path(text)
    except json.JSONDecodeError as exc:  # not JSON at all: say so as the plain parse does
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        return Rejection(reason=RejectReason.INVALID_JSON, detail=detail)
    except exact_json.NotJsonError as exc:
        return Rejection(reason=RejectReason.INVALID_JSON, detail=str(exc))
    if found is None:
        return None
    where, named = found
    return _out_of_range_somewhere(where, named if named in _KNOWN_TYPES else None)


def _out_of_range_somewhere(where: str = "<unknown>", event_type: str | None = None) -> Rejection:
    return Rejection(
        reason=RejectReason.SCHEMA_INVALID,
        detail=f"{where}: number out of range (at most {exact_json.MAX_NUMBER_DIGITS} digits"
        " before and after the point)"[:_DETAIL_LIMIT],
        event_type=event_type,
    )


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
    if _is_v0(document):  # never a current-version event: upcast without trying it as one
        return _upcast_v0(document, timestamp_ms)
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


def _is_v0(document: Any) -> bool:
    """What _validate upcasts once the current models refuse it: schema_version the integer 0
    (the current models take only the integer 1), and no type this consumer does not know."""
    if not isinstance(document, dict):
        return False
    version, event_type = document.get("schema_version"), document.get("type")
    return (
        type(version) is int
        and version == 0
        and not (isinstance(event_type, str) and event_type not in _KNOWN_TYPES)
    )


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
    escapes), so a replay after an upgrade finds the rows it created before. Two bodies that
    differ only in digits a float cannot hold (`0.1` and `0.10000000000000000001`, or `1e400`
    and `2e400`, both `Infinity`) share an id: docs/contract.md#the-v0-legacy-body."""
    canonical = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_as_float
    )
    return uuid.uuid5(LEGACY_EVENT_NAMESPACE, canonical)


def _as_float(value: Any) -> float:
    """The encoder's hook for what JSON has no type for: a Decimal is written as the float it
    rounds to, as every release did (converted where it stands, not in a copy of the body)."""
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


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


def _describe(errors: list[ErrorDetails]) -> str:
    """`location: error_type (schema context)` for each error, built from the schema side only."""
    parts = []
    for err in errors[:5]:
        # A key is free text in a breakdown or a document: shown only if shaped like a field.
        loc = ".".join(
            exact_json.shown_key(p) if isinstance(p, str) else str(p) for p in err["loc"]
        )
        loc = loc or "<root>"
        ctx: Mapping[str, Any] = err.get("ctx") or {}
        shown = ", ".join(f"{k}={ctx[k]}" for k in _SAFE_CONTEXT if k in ctx)
        if err["type"] in _ERROR_TEXT_SAFE and "error" in ctx:
            shown = str(ctx["error"])
        parts.append(f"{loc}: {err['type']}" + (f" ({shown})" if shown else ""))
    if len(errors) > 5:
        parts.append(f"... {len(errors) - 5} more")
    return "; ".join(parts)[:_DETAIL_LIMIT]
