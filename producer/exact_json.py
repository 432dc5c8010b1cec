"""JSON text parsed with exact numbers, within the range every path can read back
(docs/contract.md#numbers).

Non-integers are parsed as Decimal (`12345678901234567890.123` is not rounded through a float)
and `NaN`/`Infinity` are not JSON. A number is accepted only if, written out, it has at most
MAX_NUMBER_DIGITS digits before the point and as many after it: PostgreSQL stores jsonb
numbers as numeric and prints them in full (`1e4400` as a 4,401-digit integer), and Python
reads an integer of at most 4,300 digits (sys.get_int_max_str_digits), so the bound leaves room
for every path that reads stored numbers back and sums them (verify, the relay, usage). And
since `1e999` is 5 characters on the wire and 1,000 once stored, a record's numbers may grow it
by at most MAX_EXPANSION characters when written out: a 1 MiB record cannot become 170 MiB of
stored breakdown, billing record and memory.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

MAX_NUMBER_DIGITS = 1000
MAX_EXPANSION = 64 * 1024
# A key shown in a path: a field name's shape. Anything else (a key is free text in a content
# part or a breakdown) is shown as `*`, so that a detail never quotes chat text.
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_NUMBER_DIGITS + 1))
_INTEGER_BOUND: int = 10**MAX_NUMBER_DIGITS


class NotJsonError(ValueError):
    """Text the JSON grammar allows only as an extension (NaN, Infinity)."""


class NumberOutOfRangeError(ValueError):
    """A number past MAX_NUMBER_DIGITS (`out_of_range_path` says where)."""


class NumbersTooLongError(ValueError):
    """The record's numbers, written out, would grow it by more than MAX_EXPANSION."""

    def __init__(self, expansion: int) -> None:
        super().__init__(
            f"numbers written out would add {expansion} characters (at most {MAX_EXPANSION})"
        )
        self.expansion = expansion


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


def written_out(number: Decimal) -> int:
    """How many digits PostgreSQL prints for `number` (in range): its integer part (at least
    one digit) and its fraction."""
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # in range: finite
    return max(number.adjusted() + 1, 1) + max(-exponent, 0)


def _not_a_number(token: str) -> Any:
    raise NotJsonError(f"{token} is not JSON")


class _Parser:
    """One JSON decoder for every record (json.loads with hooks would build one per call),
    counting how much the record's non-integer numbers grow when written out. Integers are
    stored as written. Not for concurrent use: the decoder runs on one thread."""

    def __init__(self) -> None:
        self.expansion = 0
        self._decoder = json.JSONDecoder(parse_float=self._number, parse_constant=_not_a_number)

    def _number(self, text: str) -> Decimal:
        try:
            number = Decimal(text)
        except ArithmeticError:  # an exponent past what Decimal holds
            raise NumberOutOfRangeError from None
        if not number_in_range(number):
            raise NumberOutOfRangeError
        self.expansion += max(0, written_out(number) - len(text))
        return number

    def parse(self, text: str) -> Any:
        self.expansion = 0
        document = self._decoder.decode(text)
        if self.expansion > MAX_EXPANSION:
            raise NumbersTooLongError(self.expansion)
        return document


_PARSER = _Parser()


def parse(text: str) -> Any:
    """The JSON value of `text`: NotJsonError, NumberOutOfRangeError, NumbersTooLongError or
    json.JSONDecodeError when it is none that every path can hold. Call
    `may_hold_a_long_integer` on the bytes first: an integer of thousands of digits costs
    quadratic time to parse."""
    if text.startswith("\ufeff"):  # what json.loads refuses before decoding
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _PARSER.parse(text)


def may_hold_a_long_integer(value: bytes) -> bool:
    """Whether the text has a run of more than MAX_NUMBER_DIGITS digits (in a number, or in a
    string: `out_of_range_path` tells which)."""
    return _LONG_DIGIT_RUN.search(value) is not None


class _OutOfRange:
    """Where a number outside the accepted range stood (found by `out_of_range_path`)."""


_OUT_OF_RANGE = _OutOfRange()


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its pairs, duplicate keys included (the plain parse keeps the last)."""


def _located_int(text: str) -> int | _OutOfRange:
    digits = len(text) - text.startswith("-")
    return _OUT_OF_RANGE if digits > MAX_NUMBER_DIGITS else int(text)


def _located_float(text: str) -> Decimal | _OutOfRange:
    try:
        number = Decimal(text)
    except ArithmeticError:
        return _OUT_OF_RANGE
    return number if number_in_range(number) else _OUT_OF_RANGE


_LOCATING_DECODER = json.JSONDecoder(
    parse_int=_located_int,
    parse_float=_located_float,
    parse_constant=_not_a_number,
    object_pairs_hook=_Pairs,
)


def out_of_range_path(text: str) -> tuple[str, str | None] | None:
    """Where the first number outside the accepted range stands (a dotted path of field names,
    `*` for a key that is not one, array indexes) and the document's top-level `type` if it is
    a string; None when every number is within the range. json.JSONDecodeError or
    NotJsonError when the text is not JSON at all."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    document = _LOCATING_DECODER.decode(text)
    types = [v for k, v in document if k == "type"] if isinstance(document, _Pairs) else []
    named = types[-1] if types and isinstance(types[-1], str) else None
    stack: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if value is _OUT_OF_RANGE:
            return ".".join(path) or "<root>", named
        if isinstance(value, _Pairs):
            stack.extend((v, (*path, shown_key(k))) for k, v in reversed(value))
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in reversed(list(enumerate(value))))
    return None


def shown_key(key: str) -> str:
    """A key as a detail may show it: itself if shaped like a field name, else `*`."""
    return key if _FIELD_NAME.fullmatch(key) else "*"
