"""Numbers every path can read back (docs/contract.md#numbers): the range, the budget of what
a record's numbers may add once written out, where the decoder says a bad one stands, and that
no number can make the decoder raise."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from producer import exact_json
from producer.decoding import decode_event
from producer.events import MessageAppended, Rejection, RejectReason, TurnFinalized, TurnStarted
from tests.examples import example

PLACEHOLDER = '"type": "text"'


def _finalized_with(extra: str) -> bytes:
    """The example turn.finalized whose first content part carries `extra` (raw JSON)."""
    text = json.dumps(example("turn.finalized")).replace(PLACEHOLDER, f"{PLACEHOLDER}, {extra}", 1)
    return text.encode()


def _decoded(value: bytes) -> TurnStarted | TurnFinalized | MessageAppended | Rejection:
    result = decode_event(value, timestamp_ms=None)
    assert not isinstance(result, Exception)
    return result


@pytest.mark.parametrize(
    "number",
    ["1e999", "-1e999", "1.5e999", "1e+999", "1e-1000", "-0", "0.5e-999", "9" * 1000, "1E5"],
)
def test_numbers_within_the_range_are_accepted(number: str) -> None:
    assert isinstance(_decoded(_finalized_with(f'"x": {number}')), TurnFinalized)


@pytest.mark.parametrize(
    "number",
    ["1e1000", "-1e1000", "1e-1001", "0e-5000", "9" * 1001, "-" + "9" * 5000, "1e4400"],
)
def test_a_number_past_the_range_is_schema_invalid_naming_its_field(number: str) -> None:
    rejected = _decoded(_finalized_with(f'"x": {number}'))
    assert isinstance(rejected, Rejection)
    assert rejected.reason is RejectReason.SCHEMA_INVALID
    assert rejected.detail.startswith("content.0.x: number out of range")
    assert rejected.event_type == "turn.finalized"


def test_an_exponent_past_what_a_decimal_holds_is_out_of_range_not_a_crash() -> None:
    huge = "1e99999999999999999999999"
    for value in (
        _finalized_with(f'"x": {huge}'),
        _finalized_with(f'"s": "{"1" * 2000}", "x": {huge}'),
    ):
        rejected = _decoded(value)
        assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID


def test_a_bad_number_under_a_key_repeated_later_is_still_found() -> None:
    # The plain parse keeps the last of two equal keys; the number before it was out of range.
    rejected = _decoded(_finalized_with('"x": 1e5000, "x": 1'))
    assert isinstance(rejected, Rejection)
    assert rejected.detail.startswith("content.0.x: number out of range")


def test_a_key_that_is_not_a_field_name_is_not_quoted() -> None:
    secret = "my card number is 4111 1111 1111 1111"
    rejected = _decoded(_finalized_with(f'"{secret}": 1e5000'))
    assert isinstance(rejected, Rejection)
    assert secret not in rejected.detail
    assert rejected.detail.startswith("content.0.*: number out of range")


def test_a_validation_detail_does_not_quote_a_free_text_key() -> None:
    body = example("message.appended")
    body["token_usage"]["usage"] = {"my password is hunter2": {"cost_micros": -1}}
    rejected = _decoded(json.dumps(body).encode())
    assert isinstance(rejected, Rejection)
    assert "hunter2" not in rejected.detail
    assert "token_usage.usage.*.cost_micros" in rejected.detail


def test_numbers_that_would_grow_the_record_past_the_budget_are_refused() -> None:
    # 1e999 is 5 characters here and 1,000 once PostgreSQL writes it out.
    within = exact_json.MAX_EXPANSION // 1000
    accepted = _decoded(_finalized_with('"x": [' + ",".join(["1e999"] * within) + "]"))
    assert isinstance(accepted, TurnFinalized)
    rejected = _decoded(_finalized_with('"x": [' + ",".join(["1e999"] * (within + 1)) + "]"))
    assert isinstance(rejected, Rejection)
    assert rejected.reason is RejectReason.SCHEMA_INVALID
    assert rejected.detail.startswith("numbers written out would add")


def test_a_megabyte_of_long_integers_is_judged_without_parsing_them() -> None:
    # A million-digit integer would take minutes to parse (quadratic): it is found by a scan of
    # the bytes first. (The test's timeout is what fails if it were parsed.)
    rejected = _decoded(_finalized_with('"x": ' + "9" * 1_000_000))
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID
    within = _decoded(_finalized_with('"x": [' + ",".join(["9" * 999] * 1000) + "]"))
    assert isinstance(within, TurnFinalized)


def test_the_exact_parse_keeps_a_decimal_digit_for_digit() -> None:
    assert exact_json.parse('{"x": 12345678901234567890.123}') == {
        "x": Decimal("12345678901234567890.123")
    }
