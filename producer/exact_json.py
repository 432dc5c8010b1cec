"""JSON text parsed with exact numbers, within the range every path can read back
(docs/contract.md#numbers).

Non-integers are parsed as Decimal (`12345678901234567890.123` is not rounded through a float)
and `NaN`/`Infinity` are not JSON. A number is accepted only if, written out, it has at most
MAX_NUMBER_DIGITS digits before the point and as many after it: PostgreSQL stores jsonb
numbers as numeric and prints them in full (`1e4400` as a 4,401-digit integer), and Python
reads an integer of at most 4,300 digits (sys.get_int_max_str_digits), so the bound leaves room
for every path that reads stored numbers back and sums them (verify, the relay, usage).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_NUMBER_DIGITS = 1000
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
_INTEGER_BOUND: int = 10**MAX_NUMBER_DIGITS


class NotJsonError(ValueError):
    """Text the JSON grammar allows only as an extension (NaN, Infinity)."""


class NumberOutOfRangeError(ValueError):
    """A number past MAX_NUMBER_DIGITS (`out_of_range_path` says where)."""


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
        raise NotJsonError(f"bad number at {text[:20]!r}") from None
    if not number_in_range(number):
        raise NumberOutOfRangeError
    return number


def _not_a_number(token: str) -> Any:
    raise NotJsonError(f"{token} is not JSON")


# One decoder for every record: json.loads with hooks would build a new one per call.
_DECODER = json.JSONDecoder(parse_float=_exact_number, parse_constant=_not_a_number)


def parse(text: str) -> Any:
    """The JSON value of `text`: NotJsonError, NumberOutOfRangeError or json.JSONDecodeError
    when it is none. Call `may_hold_a_long_integer` on the bytes first: an integer of
    thousands of digits costs quadratic time to parse."""
    if text.startswith("\ufeff"):  # what json.loads refuses before decoding
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def may_hold_a_long_integer(value: bytes) -> bool:
    """Whether the text has a run of more than MAX_NUMBER_DIGITS digits (in a number, or in a
    string: `out_of_range_path` tells which)."""
    return _LONG_DIGIT_RUN.search(value) is not None


class _OutOfRange:
    """Where a number outside the accepted range stood (found by `out_of_range_path`)."""


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


def out_of_range_path(text: str) -> tuple[str, Any] | None:
    """Where the first number outside the accepted range stands (a dotted path) and the parsed
    document, or None when every number is within it. json.JSONDecodeError or NotJsonError when
    the text is not JSON at all."""
    document = _LOCATING_DECODER.decode(text)
    stack: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if value is _OUT_OF_RANGE:
            return ".".join(path) or "<root>", document
        if isinstance(value, dict):
            stack.extend((v, (*path, str(k)[:64])) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in reversed(list(enumerate(value))))
    return None
