"""The usage API's pure parts: keys (made, parsed, digested), group_by and the cursor
(docs/operations.md#the-usage-api)."""

from __future__ import annotations

import base64
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.api.keys import digest, new_key, parse
from consumer.api.queries import (
    GROUP_COLUMNS,
    BadParameterError,
    decode_cursor,
    encode_cursor,
    parse_group_by,
)
from consumer.settings import SettingsError, load_settings


def test_a_new_key_parses_back_to_its_lookup_id_and_a_secret_of_256_bits() -> None:
    key, lookup_id, stored = new_key()
    parsed = parse(key)
    assert parsed is not None
    assert parsed[0] == lookup_id and len(parsed[1]) == 43  # base64 of 32 bytes
    assert hmac.compare_digest(stored, digest(lookup_id, parsed[1]))
    assert key != new_key()[0]


def test_a_digest_is_bound_to_its_lookup_id_and_never_holds_the_secret() -> None:
    key, _, stored = new_key()
    _, secret = parse(key) or ("", "")
    assert digest("0" * 16, secret) != stored
    assert secret.encode() not in stored and len(stored) == 32


@pytest.mark.parametrize(
    "bad",
    ["", "tl_", "tl_0123456789abcdef_", "tl_0123456789ABCDEF_" + "a" * 43, "xx_0_" + "a" * 43],
)
def test_malformed_keys_do_not_parse(bad: str) -> None:
    assert parse(bad) is None
    assert parse(bad + "\n") is None


def test_group_by_takes_commas_and_repeats_each_group_once() -> None:
    assert parse_group_by(["model, day", "user"]) == ("model", "day", "user")
    assert parse_group_by(None) == ()
    for bad in (["model,model"], ["model", "model"], ["planet"], [""]):
        with pytest.raises(BadParameterError) as raised:
            parse_group_by(bad)
        assert raised.value.name == "group_by"


groupings = st.lists(st.sampled_from(sorted(GROUP_COLUMNS)), min_size=1, unique=True).map(tuple)


@given(groupings.flatmap(lambda g: st.tuples(st.just(g), st.lists(
    st.text().filter(lambda v: "\x00" not in v), min_size=len(g), max_size=len(g)
).map(tuple))))  # fmt: skip
def test_a_cursor_decodes_to_its_keyset_under_its_own_grouping_only(
    page: tuple[tuple[str, ...], tuple[str, ...]],
) -> None:
    group_by, last = page
    cursor = encode_cursor(group_by, last)
    assert decode_cursor(cursor, group_by) == last
    other = (*group_by[1:], group_by[0]) if len(group_by) > 1 else ()
    with pytest.raises(BadParameterError):
        decode_cursor(cursor, other)


@pytest.mark.parametrize(
    "bad", ["", "!", "e30", "bnVsbA", "W10", "eyJnIjpbIm1vZGVsIl0sImEiOlsxXX0"]
)
def test_a_cursor_that_is_not_one_is_a_bad_parameter(bad: str) -> None:
    with pytest.raises(BadParameterError) as raised:
        decode_cursor(bad, ("model",))
    assert raised.value.name == "cursor"


def test_the_api_database_url_is_checked_like_the_ledgers() -> None:
    with pytest.raises(SettingsError, match="LEDGER_API_DATABASE_URL"):
        load_settings(api_database_url="mysql://x@y/z")
    settings = load_settings(api_database_url="postgresql+asyncpg://ro:secret@db/ledger")
    assert "secret" not in repr(settings)
    with pytest.raises(SettingsError, match="LEDGER_API_STATEMENT_TIMEOUT"):
        load_settings(api_statement_timeout=0)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"g": ["model"], "a": ["\ud800"]}),  # no UTF-8 for PostgreSQL
        "[" * 5000,  # past Python's recursion limit
        '{"g": ["model"], "a": ' + "[" * 3000 + "]" * 3000 + "}",
    ],
    ids=["lone-surrogate", "deep-array", "deep-in-a"],
)
def test_a_crafted_cursor_is_a_bad_parameter(text: str) -> None:
    cursor = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    assert len(cursor) <= 8192
    with pytest.raises(BadParameterError) as raised:
        decode_cursor(cursor, ("model",))
    assert raised.value.name == "cursor"
