"""JSON text written by a compiled encoder (msgspec), byte for byte what `jsonvalues.dumps`
writes for the same value: numbers exact (a Decimal as `str()` writes it), compact, keys in
insertion order or sorted by code point. tests/unit/producer/test_canonical.py holds the two
to each other on generated values.

`ascii_text` adds what `ensure_ascii=True` does: every character past U+007E (DEL included)
written as a `\\uXXXX` escape, astral ones as a surrogate pair. JSON text holds such characters
only inside strings, so escaping them in the whole text is escaping them in the strings; the
ASCII codec finds them in C and calls the escape once per run of them.
"""

from __future__ import annotations

import codecs
from typing import Any

import msgspec

_PLAIN = msgspec.json.Encoder(decimal_format="number")
_SORTED = msgspec.json.Encoder(decimal_format="number", order="sorted")
_ESCAPES: dict[str, str] = {}  # character -> its escape, as characters are met (bounded)
_KEPT_ESCAPES = 4096
_ERRORS = "token-ledger-json-escape"


def _escape(character: str) -> str:
    code = ord(character)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def _escape_run(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeEncodeError)
    escaped = []
    for character in error.object[error.start : error.end]:
        escape = _ESCAPES.get(character)
        if escape is None:
            escape = _escape(character)
            if len(_ESCAPES) < _KEPT_ESCAPES:
                _ESCAPES[character] = escape
        escaped.append(escape)
    return "".join(escaped), error.end


codecs.register_error(_ERRORS, _escape_run)


def text(value: Any) -> str:
    """Compact JSON, keys in insertion order (what jsonb columns are written from)."""
    return _PLAIN.encode(value).decode()


def sorted_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON with sorted keys (what a billing record is)."""
    return _SORTED.encode(value)


def ascii_text(value: Any) -> bytes:
    """Compact JSON with sorted keys and only ASCII characters (what a digest is taken of)."""
    encoded = _SORTED.encode(value)
    if not encoded.isascii():
        encoded = encoded.decode().encode("ascii", _ERRORS)
    if b"\x7f" in encoded:  # ASCII, but escaped all the same
        encoded = encoded.replace(b"\x7f", b"\\u007f")
    return encoded
