"""JSON text written by a compiled encoder (msgspec), byte for byte what `jsonvalues.dumps`
writes for the same value: numbers exact (a Decimal as `str()` writes it), compact, keys in
insertion order or sorted by code point. tests/unit/producer/test_canonical.py holds the two
to each other on generated values.

`ascii_text` adds what `ensure_ascii=True` does: every character past U+007E (DEL included)
written as a `\\uXXXX` escape, astral ones as a surrogate pair. JSON text holds such characters
only inside strings, so escaping them in the whole text is escaping them in the strings: the
ASCII codec escapes them in C (`backslashreplace`), and two substitutions give its escapes the
form JSON has (text with a literal backslash goes through an exact handler instead).
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import msgspec

_PLAIN = msgspec.json.Encoder(decimal_format="number")
_SORTED = msgspec.json.Encoder(decimal_format="number", order="sorted")
# After the `backslashreplace` codec, `\xe9` is what `ensure_ascii` writes as `\u00e9`, and an
# astral `\U0001f680` is its surrogate pair. JSON text never holds `\x` or `\U` itself; a
# literal backslash in a string (`\\`) could make one, so such text takes the exact handler.
_ASTRAL = re.compile(rb"\\U([0-9a-f]{8})")
_ERRORS = "token-ledger-json-escape"


def _escape(character: str) -> str:
    code = ord(character)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def _pair(match: re.Match[bytes]) -> bytes:
    return _escape(chr(int(match.group(1), 16))).encode()


def _escape_run(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeEncodeError)
    return "".join(map(_escape, error.object[error.start : error.end])), error.end


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
        if b"\\\\" in encoded:  # a literal backslash: each character escaped by the handler
            encoded = encoded.decode().encode("ascii", _ERRORS)
        else:
            encoded = encoded.decode().encode("ascii", "backslashreplace")
            # Every `\x` is the codec's (see above): a plain replacement, no regex (whose
            # template Python 3.11 expands in Python, match by match).
            encoded = encoded.replace(b"\\x", b"\\u00")
            if b"\\U" in encoded:
                encoded = _ASTRAL.sub(_pair, encoded)
    if b"\x7f" in encoded:  # ASCII, but escaped all the same
        encoded = encoded.replace(b"\x7f", b"\\u007f")
    return encoded
