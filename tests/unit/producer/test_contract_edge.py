"""The contract's edge (docs/contract.md#forward-compatibility): what loose or newer producers send is accepted and kept
exactly; what cannot be stored faithfully is rejected at the decoder, never by the database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from consumer.http.metrics import LedgerMetrics
from consumer.ledger.claims import StoredState
from consumer.ledger.decode import BatchDecoder
from consumer.ledger.merge import reduce_batch
from producer import jsonvalues
from producer.decoding import decode_event
from producer.events import (
    DEFAULT_MAX_EVENT_BYTES,
    UNATTRIBUTED,
    MessageAppended,
    Rejection,
    RejectReason,
    TurnFinalized,
    TurnStarted,
    attribution,
)
from producer.ledger_event import ledger_event
from tests.examples import example
from tests.factories import ledger_events

TS = 1_795_684_502_118  # 2026-11-26T09:15:02.118Z, when the examples happened


def _decode(body: dict[str, Any] | bytes, ts: int | None = TS) -> Any:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decode_event(value, timestamp_ms=ts)


def _unknown_fields(body: dict[str, Any]) -> dict[str, int]:
    """What the consumer counts in token_ledger_unknown_fields_total{type} for the record."""
    decode = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=None)
    decode(json.dumps(body).encode(), TS)
    return decode.unknown_fields


def _legacy_with(usage: Any) -> dict[str, Any]:
    body = example("message.appended")
    body["token_usage"]["usage"] = usage
    return body


# -- 1. loose legacy breakdowns --------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        {"gpt-4o-mini": {"prompt_tokens": 464}},
        {"gpt-4o-mini": {}, "claude": {"cost_micros": 5, "completion_tokens": 1}},
        {},
        None,
        {"gpt-4o-mini": {"prompt_tokens": 464, "cached_tokens": 12}},
    ],
)
def test_a_loose_legacy_breakdown_is_accepted_and_kept_as_sent(usage: Any) -> None:
    event = _decode(_legacy_with(usage))
    assert isinstance(event, MessageAppended), event
    (row,) = reduce_batch(ledger_events([event]), StoredState()).usage
    assert row.model_breakdown == (usage or {})
    assert row.cost_micros == example("message.appended")["token_usage"]["cost_micros"]


def test_a_negative_count_in_a_legacy_breakdown_is_still_rejected() -> None:
    rejected = _decode(_legacy_with({"m": {"prompt_tokens": -1}}))
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID


# -- 2. every usage row is counted, the uncovered part as (unattributed) -----------------------


def _counted(metrics: LedgerMetrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.mark.parametrize("usage", [None, {}, {"gpt-4o-mini": {"prompt_tokens": 4}}])
def test_usage_without_a_full_breakdown_reaches_the_counters(usage: Any) -> None:
    event = _decode(_legacy_with(usage))
    plan = reduce_batch(ledger_events([event]), StoredState())
    metrics = LedgerMetrics()
    metrics.count_usage(plan.usage_changes)
    cost = event.token_usage.cost_micros
    counted = _counted(
        metrics, "token_ledger_cost_micros_total", {"model": UNATTRIBUTED}
    ) + _counted(metrics, "token_ledger_cost_micros_total", {"model": "gpt-4o-mini"})
    assert counted == cost
    prompt = event.token_usage.prompt_tokens
    assert _counted(
        metrics, "token_ledger_tokens_total", {"model": UNATTRIBUTED, "kind": "prompt"}
    ) == prompt - (4 if usage else 0)


def test_attribution_always_sums_to_the_totals() -> None:
    totals = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost_micros": 100}
    shares = attribution(totals, {"a": {"cost_micros": 150}, "b": {"prompt_tokens": 3}})
    for name, total in totals.items():
        assert sum(share[name] for share in shares.values()) == total
    assert shares[UNATTRIBUTED]["cost_micros"] == -50  # the breakdown claims more than the row


# -- 3. differing copies of one event_id -------------------------------------------------------


def test_a_v0_body_resent_later_is_a_differing_copy_ordered_the_same_way_in_any_order() -> None:
    body = example("message.appended.v0")
    first, later = _decode(body, TS), _decode(body, TS + 60_000)
    assert first.event_id == later.event_id and first.occurred_at != later.occurred_at
    one_batch = reduce_batch(ledger_events([first, later]), StoredState())
    other_order = reduce_batch(ledger_events([later, first]), StoredState())
    assert one_batch.messages == other_order.messages
    # Content: the later occurred_at wins, whichever arrived first.
    (message,) = one_batch.messages
    assert message.claim.at == later.occurred_at


def test_copies_that_differ_only_in_payload_are_ordered_by_digest() -> None:
    event = _decode(example("turn.finalized"))
    other = event.model_copy(update={"content": []})
    assert ledger_event(event).digest != ledger_event(other).digest
    a = reduce_batch(ledger_events([event, other]), StoredState())
    b = reduce_batch(ledger_events([other, event]), StoredState())
    assert a.messages == b.messages and a.usage == b.usage


# -- 4. numbers: exact, and never NaN / Infinity ----------------------------------------------


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_number_tokens_are_invalid_json(token: bytes) -> None:
    text = json.dumps(example("turn.finalized")).encode()
    value = text.replace(b'"text": "', b'"score": ' + token + b', "text": "', 1)
    rejected = _decode(value)
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.INVALID_JSON


def test_numbers_in_content_are_kept_digit_for_digit() -> None:
    body = example("turn.finalized")
    raw = json.dumps(body).replace(
        '"type": "text"', '"type": "text", "x": 12345678901234567890.123, "y": 1e400', 1
    )
    event = _decode(raw.encode())
    assert isinstance(event, TurnFinalized)
    (message,) = reduce_batch(ledger_events([event]), StoredState()).messages
    stored = message.content  # the JSON text the column is written from
    assert "12345678901234567890.123" in stored and "1E+400" in stored


def test_a_number_postgresql_cannot_store_is_rejected_by_the_decoder() -> None:
    raw = json.dumps(example("turn.finalized")).replace(
        '"type": "text"', '"type": "text", "x": 1e200000', 1
    )
    rejected = _decode(raw.encode())
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID
    assert rejected.detail.startswith("content.0.x: number out of range")


def test_a_v0_body_keeps_numbers_and_rejects_nan() -> None:
    body = json.dumps(example("message.appended.v0"))
    exact = body.replace('"type": "text"', '"type": "text", "n": 0.1000000000000000055511', 1)
    event = _decode(exact.encode())
    assert isinstance(event, MessageAppended)
    assert event.content[0].model_dump()["n"] == Decimal("0.1000000000000000055511")
    nan = body.replace('"type": "text"', '"type": "text", "n": NaN', 1)
    assert _decode(nan.encode()).reason is RejectReason.INVALID_JSON


# -- 5. fields this consumer does not know ------------------------------------------------------


def test_unknown_fields_are_accepted_kept_where_they_belong_and_counted() -> None:
    body = example("turn.finalized")
    body["trace_id"] = "t-1"  # envelope: ignored
    body["usage"]["currency"] = "USD"  # usage object: ignored
    body["usage"]["calls"][0]["audio_tokens"] = 120  # call: kept in call_details
    body["usage"]["calls"][0]["provider_latency_ms"] = 30
    body["content"][0]["citations"] = [1, 2]  # content part: kept (not unknown: parts are open)
    event = _decode(body)
    assert isinstance(event, TurnFinalized), event
    assert _unknown_fields(body) == {"turn.finalized": 4}
    (row,) = reduce_batch(ledger_events([event]), StoredState()).usage
    assert jsonvalues.loads(row.call_details)["calls"][0]["audio_tokens"] == 120
    (message,) = reduce_batch(ledger_events([event]), StoredState()).messages
    assert jsonvalues.loads(message.content)[0]["citations"] == [1, 2]


def test_an_unknown_field_in_a_v0_body_is_accepted() -> None:
    body = example("message.appended.v0")
    body["client_version"] = "7.1"
    event = _decode(body)
    assert isinstance(event, MessageAppended)
    assert _unknown_fields(body) == {"message.appended": 1}


# -- 6. occurred_at is bounded by the record's timestamp ---------------------------------------


def test_an_event_stamped_in_the_future_is_dead_lettered() -> None:
    body = example("turn.started")
    occurred = datetime.fromtimestamp(TS / 1000, UTC)
    body["occurred_at"] = (occurred + timedelta(days=365)).isoformat()
    rejected = _decode(body)
    assert isinstance(rejected, Rejection)
    assert rejected.reason is RejectReason.OCCURRED_AT_IN_FUTURE
    body["occurred_at"] = (occurred + timedelta(minutes=59)).isoformat()
    assert isinstance(_decode(body), TurnStarted)
    skew = decode_event(json.dumps(body).encode(), timestamp_ms=TS, max_future_skew=timedelta(1))
    assert isinstance(skew, TurnStarted)


@pytest.mark.parametrize(
    "stamp",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "10000-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",  # read back by asyncpg as -infinity
        "9999-12-31T23:59:59.999999Z",  # and this one as infinity
    ],
)
def test_a_timestamp_outside_the_utc_range_is_schema_invalid(stamp: str) -> None:
    body = {**example("turn.started"), "occurred_at": stamp}
    rejected = _decode(body, ts=None)
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID


# -- found by review: each failed before its fix ----------------------------------------------


def test_deep_nesting_is_invalid_json_whatever_it_holds() -> None:
    deep = "[" * 400 + "1.5" + "]" * 400
    finalized = json.dumps(example("turn.finalized")).replace('{"hits": 3}', deep)
    with_pair = json.dumps(example("turn.finalized")).replace(
        '{"hits": 3}', '{"s": "\\ud83d\\ude00", "d": ' + deep + "}"
    )
    v0 = json.dumps(example("message.appended.v0")).replace(
        '"text": "an old', '"x": ' + "[" * 600 + "1" + "]" * 600 + ', "text": "an old'
    )
    for text in (finalized, with_pair, v0):
        rejected = _decode(text.encode())
        assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.INVALID_JSON
    shallow = json.dumps(example("turn.finalized")).replace(
        '{"hits": 3}', "[" * 100 + "1.5" + "]" * 100
    )
    event = _decode(shallow.encode())
    assert isinstance(event, TurnFinalized)
    reduce_batch(
        ledger_events([event]), StoredState()
    )  # the digest and the merge walk it without trouble


def test_a_record_without_a_timestamp_is_not_in_the_future() -> None:
    assert isinstance(_decode(example("turn.finalized"), ts=-1), TurnFinalized)


def test_a_breakdown_naming_unattributed_still_adds_up() -> None:
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_micros": 12345}
    shares = attribution(totals, {UNATTRIBUTED: {"cost_micros": 3000}, "m": {"cost_micros": 5000}})
    assert sum(share["cost_micros"] for share in shares.values()) == 12345


def test_absent_and_null_measures_are_different_copies() -> None:
    body = _legacy_with({"gpt-4o-mini": {"prompt_tokens": 100}})
    absent = _decode(body)
    body["token_usage"]["usage"]["gpt-4o-mini"]["cost_micros"] = None
    null = _decode(body)
    assert ledger_event(absent).digest != ledger_event(null).digest
    a, b = (
        reduce_batch(ledger_events([absent, null]), StoredState()),
        reduce_batch(ledger_events([null, absent]), StoredState()),
    )
    assert a.usage == b.usage


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schema_version", True),
        ("schema_version", 1.0),
        ("occurred_at", "1795684502"),
        ("occurred_at", 1795684502),
    ],
)
def test_lookalikes_of_the_contract_are_schema_invalid(field: str, value: Any) -> None:
    rejected = _decode({**example("turn.started"), field: value})
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID


def test_token_kinds_are_summed_per_model_where_reported() -> None:
    body = example("turn.finalized")
    first = body["usage"]["calls"][0]
    body["usage"]["calls"] = [
        {**first, "model": "m1", "cached_tokens": 120, "reasoning_tokens": 30},
        {**first, "model": "m1", "cached_tokens": 5},
        {**first, "model": "m2"},
    ]
    event = _decode(body)
    assert isinstance(event, TurnFinalized), event
    assert _unknown_fields(body) == {}  # known: not counted as unknown
    (row,) = reduce_batch(ledger_events([event]), StoredState()).usage
    assert row.model_breakdown["m1"]["cached_tokens"] == 125
    assert row.model_breakdown["m1"]["reasoning_tokens"] == 30
    assert "cached_tokens" not in row.model_breakdown["m2"]  # not reported is not zero
    assert jsonvalues.loads(row.call_details)["calls"][0]["cached_tokens"] == 120
