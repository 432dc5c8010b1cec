"""The compiled encoder (producer/canonical.py) writes, byte for byte, what the pure-Python one
(producer/jsonvalues.py) wrote for the same value: the digests and jsonb text stored by every
release before it stay what a redelivery computes now."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer import canonical, jsonvalues

# Text from every plane, DEL and the control characters included (no lone surrogates: JSON
# text that names one is refused before it becomes a value).
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12) | st.lists(
    st.sampled_from(["\\", "x", "U", "e9", "0001f680", "é", "\U0001f680"]), max_size=8
).map("".join)
numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal("1E+400"), Decimal("-0"), Decimal("0E-7"), Decimal("1.50")]),
)
values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | numbers | texts | st.uuids(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1000, deadline=None)
@given(values)
def test_the_compiled_encoder_writes_what_the_python_one_wrote(value: Any) -> None:
    assert canonical.ascii_text(value).decode("ascii") == jsonvalues.dumps(
        value, sort_keys=True, ensure_ascii=True
    )
    assert canonical.text(value) == jsonvalues.dumps(value)
    assert canonical.sorted_bytes(value) == jsonvalues.dumps(value, sort_keys=True).encode()


@pytest.mark.parametrize(
    "text",
    ["\\xe9é", "\\\\xe9", "\\U0001f680\U0001f680", "\\\U0001f680", "x\\\\\\é", "\\u00e9é"],
)
def test_a_backslash_in_the_text_is_never_taken_for_an_escape(text: str) -> None:
    value = {"t": text, text: [text]}
    assert canonical.ascii_text(value).decode("ascii") == jsonvalues.dumps(
        value, sort_keys=True, ensure_ascii=True
    )


def test_characters_past_ascii_are_escaped_as_python_escapes_them() -> None:
    value = {"\U0001f680": "é\x7f\u2028\U0010ffff", "a": uuid.UUID(int=7)}
    assert canonical.ascii_text(value) == (
        b'{"a":"00000000-0000-0000-0000-000000000007",'
        b'"\\ud83d\\ude80":"\\u00e9\\u007f\\u2028\\udbff\\udfff"}'
    )


def test_an_astral_character_escapes_alike_every_time() -> None:
    """The second time, its surrogate pair is the remembered one."""
    value = {"t": "\U0001f680 \U0001f9ea \U0001f680", "\U0001f9ea": "\U0010ffff"}
    expected = jsonvalues.dumps(value, sort_keys=True, ensure_ascii=True).encode()
    assert canonical.ascii_text(value) == expected
    assert canonical.ascii_text(value) == expected
