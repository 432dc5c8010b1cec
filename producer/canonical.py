"""JSON text written by a compiled encoder (msgspec), byte for byte what `jsonvalues.dumps`
writes for the same value: numbers exact (a Decimal as `str()` writes it), compact, keys in
insertion order or sorted by code point. tests/unit/producer/test_canonical.py holds the two
to each other on generated values.

`ascii_text` adds what `ensure_ascii=True` does: every character past U+007E (DEL included)
written as a `\\uXXXX` escape, astral ones as a surrogate pair. JSON text holds such characters
only inside strings, so escaping them in the whole text is escaping them in the strings: the
ASCII codec escapes them in C (`backslashreplace`), and two substitutions give its escapes the
form JSON has, each only where the UTF-8 text holds a character it applies to (text with a
literal backslash goes through an exact handler instead).
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
_ASTRAL = re.compile(rb"\\U[0-9a-f]{8}")
_ERRORS = "token-ledger-json-escape"


def _escape(character: str) -> str:
    code = ord(character)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


class _Pairs(dict[bytes, bytes]):
    """The surrogate-pair escape of each `\\UNNNNNNNN` the codec wrote. Text repeats a few
    emoji; remembered up to a bound, they cost a lookup instead of a conversion."""

    def __missing__(self, codec_escape: bytes) -> bytes:
        pair = _escape(chr(int(codec_escape[2:], 16))).encode()
        if len(self) < 4096:
            self[codec_escape] = pair
        return pair


_PAIRS = _Pairs()


def _pair(match: re.Match[bytes]) -> bytes:
    return _PAIRS[match[0]]


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
        text = encoded.decode()
        # Lead bytes in the UTF-8 text: U+0080..U+00FF, which the codec writes as `\xNN`, and
        # astral characters, written as `\UNNNNNNNN`. Text with neither (CJK, say) has the
        # codec's escapes in JSON's form already. An int operand is a memchr; a bytes one
        # first fails as an int, raising and clearing a TypeError.
        latin = 0xC2 in encoded or 0xC3 in encoded
        astral = (
            0xF0 in encoded
            or 0xF1 in encoded
            or 0xF2 in encoded
            or 0xF3 in encoded
            or 0xF4 in encoded
        )
        if (latin or astral) and 0x5C in encoded and b"\\\\" in encoded:
            # A literal backslash could form `\x` or `\U`: each character escaped exactly.
            encoded = text.encode("ascii", _ERRORS)
        else:
            encoded = text.encode("ascii", "backslashreplace")
            if latin:
                # Every `\x` is the codec's (see above): a plain replacement, no regex (whose
                # template Python 3.11 expands in Python, match by match).
                encoded = encoded.replace(b"\\x", b"\\u00")
            if astral:
                encoded = _ASTRAL.sub(_pair, encoded)
    if 0x7F in encoded:  # ASCII, but escaped all the same
        encoded = encoded.replace(b"\x7f", b"\\u007f")
    return encoded
