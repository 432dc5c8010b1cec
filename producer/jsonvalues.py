"""JSON text for values that came from JSON: numbers kept exactly as sent.

The decoder parses non-integer numbers as `Decimal` (so `12345678901234567890.123` is not
rounded through a float); `dumps` writes them back digit for digit, and writes UUIDs and
datetimes (from the event models) as strings. The common case, a value without any Decimal,
takes the C encoder's fast path.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

_COMPACT = (",", ":")


class _HasDecimal(Exception):  # noqa: N818 - internal control flow: take the slow path
    pass


def _plain(value: Any) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        raise _HasDecimal
    raise TypeError(f"{type(value).__name__} is not JSON")


# Built once: json.dumps with any option set builds a new encoder per call.
_ENCODERS = {
    (sort_keys, ensure_ascii): json.JSONEncoder(
        ensure_ascii=ensure_ascii, separators=_COMPACT, sort_keys=sort_keys, default=_plain
    )
    for sort_keys in (False, True)
    for ensure_ascii in (False, True)
}


def dumps(value: Any, *, sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """Compact JSON text of `value`; Decimals are written exactly (never through a float)."""
    try:
        return _ENCODERS[sort_keys, ensure_ascii].encode(value)
    except _HasDecimal:
        return _encode(value, sort_keys, ensure_ascii)


def _encode(value: Any, sort_keys: bool, ensure_ascii: bool) -> str:
    if isinstance(value, Decimal):
        return str(value)  # e.g. '12345678901234567890.123', '1E+400': valid JSON numbers
    if isinstance(value, dict):
        items = sorted(value.items()) if sort_keys else value.items()
        return (
            "{"
            + ",".join(
                json.dumps(str(k), ensure_ascii=ensure_ascii)
                + ":"
                + _encode(v, sort_keys, ensure_ascii)
                for k, v in items
            )
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v, sort_keys, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii, default=_plain)


def _long_int(text: str) -> int | Decimal:
    return Decimal(text) if len(text) > _INT_DIGITS else int(text)


_INT_DIGITS = 4000  # below Python's default limit for int(str) (4,300 digits), sign included
_EXACT = json.JSONDecoder(parse_float=Decimal)
_EXACT_LONG = json.JSONDecoder(parse_float=Decimal, parse_int=_long_int)


_COMPILED = msgspec.json.Decoder(float_hook=Decimal)


def loads(text: str | bytes) -> Any:
    """Parse JSON with exact numbers (the inverse of `dumps`). An integer too long for Python
    to read from text (which a ledger written before numbers were bounded at decode may hold:
    PostgreSQL prints `1e4400` in full) is read as an integral Decimal instead of failing.
    msgspec parses first; what it refuses (such an integer, or text that is not JSON) is parsed
    again by the json module, which says why."""
    try:
        return _COMPILED.decode(text)
    except msgspec.DecodeError:
        pass
    if isinstance(text, bytes):
        text = text.decode()
    try:
        return _EXACT.decode(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        return _EXACT_LONG.decode(text)
