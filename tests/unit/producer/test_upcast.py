"""schema_version 0 (the legacy frontend's append body) is upcast to a v1 message.appended."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from consumer.ledger.claims import candidates
from consumer.ledger.decode import decode_ledger_event
from producer import jsonvalues
from producer.decoding import decode_event, v0_event_id
from producer.events import (
    EVENT_ADAPTER,
    LEGACY_EVENT_NAMESPACE,
    MessageAppended,
    Rejection,
    RejectReason,
)
from tests.examples import example, example_bytes

TS = 1_795_684_502_118  # 2026-11-26T09:15:02.118Z, when the examples happened


def test_v0_body_becomes_a_v1_event() -> None:
    event = decode_event(example_bytes("message.appended.v0"), timestamp_ms=TS)
    assert isinstance(event, MessageAppended)
    body = example("message.appended.v0")
    assert event.schema_version == 1
    assert event.occurred_at == datetime.fromtimestamp(TS / 1000, tz=UTC)
    assert (event.thread_id, event.search_space_id, str(event.user_id)) == (
        body["thread_id"],
        body["search_space_id"],
        body["user_id"],
    )
    assert event.turn_id is None and event.role == "user"
    assert [part.model_dump() for part in event.content] == body["content"]
    assert event.event_id.version == 5


def test_same_body_sent_twice_gets_the_same_event_id() -> None:
    first = decode_event(example_bytes("message.appended.v0"), timestamp_ms=TS)
    # Re-sent later, re-serialised with other key order and spacing: still the same body.
    resent = json.dumps(dict(reversed(example("message.appended.v0").items())), indent=1)
    second = decode_event(resent.encode(), timestamp_ms=TS + 60_000)
    assert isinstance(first, MessageAppended) and isinstance(second, MessageAppended)
    assert first.event_id == second.event_id


def test_different_bodies_get_different_event_ids() -> None:
    other = {**example("message.appended.v0"), "content": [{"type": "text", "text": "other"}]}
    a = decode_event(example_bytes("message.appended.v0"), timestamp_ms=TS)
    b = decode_event(json.dumps(other).encode(), timestamp_ms=TS)
    assert isinstance(a, MessageAppended) and isinstance(b, MessageAppended)
    assert a.event_id != b.event_id


def test_v0_token_usage_with_bare_call_list_is_kept_and_normalised() -> None:
    usage = {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "cost_micros": 4,
        "call_details": [{"model": "m", "cost_micros": 4}],
    }
    body = {**example("message.appended.v0"), "role": "assistant", "token_usage": usage}
    event = decode_ledger_event(json.dumps(body).encode(), timestamp_ms=TS)
    assert not isinstance(event, Rejection)
    _, usage_row = candidates(event)
    assert usage_row is not None
    assert jsonvalues.loads(usage_row.call_details) == {"calls": [{"model": "m", "cost_micros": 4}]}


def test_v0_without_a_record_timestamp_is_rejected() -> None:
    rejected = decode_event(example_bytes("message.appended.v0"), timestamp_ms=None)
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID


# What every release before computed the v0 event_id from: the body copied with its Decimals
# as floats, then encoded.
def _floats_copied(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats_copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_copied(v) for v in value]
    return value


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    # A signalling NaN is no JSON number: float() refuses it, before and now alike.
    | st.decimals(allow_nan=True, allow_infinity=True, places=None).filter(
        lambda d: not d.is_snan()
    )
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=1_000, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=8))
def test_the_v0_event_id_is_the_one_every_release_gave(body: dict[str, Any]) -> None:
    text = json.dumps(
        _floats_copied(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    assert v0_event_id(body) == uuid.uuid5(LEGACY_EVENT_NAMESPACE, text)


@settings(max_examples=500, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            name: _JSON_VALUES
            for name in (*example("turn.finalized"), *example("message.appended"), "usage")
        },
    ),
    st.sampled_from(["turn.started", "turn.finalized", "message.appended", None]),
)
def test_no_body_of_schema_version_0_is_a_current_event(
    fields: dict[str, Any], event_type: str | None
) -> None:
    """Why a v0 body is upcast without first being tried as a current event (as releases
    before did): the current models take schema_version 1 only, so that try always failed."""
    body = {**example("message.appended"), **fields, "schema_version": 0}
    if event_type is not None:
        body["type"] = event_type
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(body)
