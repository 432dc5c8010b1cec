"""schema_version 0 (the legacy frontend's append body) is upcast to a v1 message.appended."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from consumer.ledger.claims import candidates
from consumer.ledger.decode import decode_ledger_event
from producer.decoding import decode_event
from producer.events import MessageAppended, Rejection, RejectReason
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
    assert usage_row.call_details == {"calls": [{"model": "m", "cost_micros": 4}]}


def test_v0_without_a_record_timestamp_is_rejected() -> None:
    rejected = decode_event(example_bytes("message.appended.v0"), timestamp_ms=None)
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.SCHEMA_INVALID
