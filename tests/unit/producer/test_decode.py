"""decode_event: every rule of the contract maps a bad record to its reason code."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

import pytest

from consumer.ledger.decode import BatchDecoder
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer.decoding import decode_event
from producer.events import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_INT64,
    MessageAppended,
    Rejection,
    RejectReason,
    TurnFinalized,
    TurnStarted,
    encode_event,
)
from producer.ledger_event import LedgerEvent, ledger_event
from tests.examples import EXAMPLE_NAMES, EXAMPLES_DIR, SHARED_EXAMPLES_DIR, example, example_bytes

TS = 1_795_684_502_118  # 2026-11-26T09:15:02.118Z, when the examples happened


def _with(name: str, **changes: Any) -> bytes:
    body = example(name)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return json.dumps(body, ensure_ascii=False).encode()


_DROP = object()
_CALL = {
    "model": "m",
    "prompt_tokens": 1,
    "completion_tokens": 1,
    "total_tokens": 2,
    "cost_micros": 3,
    "call_kind": "chat",
}
_LEGACY_USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "cost_micros": 3}

BAD_INPUTS: list[tuple[str, bytes | None, RejectReason]] = [
    ("null value (tombstone)", None, RejectReason.EMPTY_VALUE),
    ("empty value", b"", RejectReason.EMPTY_VALUE),
    ("over the size limit", b'{"pad":"' + b"x" * (1024 * 1024) + b'"}', RejectReason.TOO_LARGE),
    ("invalid utf-8", b'{"type":"turn.started","x":"\xff\xfe"}', RejectReason.INVALID_UTF8),
    ("truncated utf-8 sequence", b'{"a":"\xe2\x82"}', RejectReason.INVALID_UTF8),
    ("raw NUL byte", b'{"a":"\x00"}', RejectReason.NUL_CHARACTER),
    (
        "escaped NUL in a string",
        _with("turn.started", user_query="a\u0000b"),
        RejectReason.NUL_CHARACTER,
    ),
    ("escaped NUL in a key", b'{"k\\u0000":1}', RejectReason.NUL_CHARACTER),
    (
        "escaped NUL deep in content",
        _with("turn.finalized", content=[{"type": "text", "text": "\u0000"}]),
        RejectReason.NUL_CHARACTER,
    ),
    ("not JSON", b"{not json", RejectReason.INVALID_JSON),
    ("truncated JSON", example_bytes("turn.started")[:-5], RejectReason.INVALID_JSON),
    ("trailing garbage", example_bytes("turn.started") + b"}", RejectReason.INVALID_JSON),
    (
        "lone surrogate escape",
        _with("turn.started", user_query="X").replace(b'"X"', b'"\\ud800"'),
        RejectReason.INVALID_JSON,
    ),
    ("JSON array", b"[1, 2]", RejectReason.SCHEMA_INVALID),
    ("JSON string", b'"turn.started"', RejectReason.SCHEMA_INVALID),
    ("unknown type", _with("turn.started", type="turn.exploded"), RejectReason.UNKNOWN_TYPE),
    ("missing type", _with("turn.started", type=_DROP), RejectReason.SCHEMA_INVALID),
    (
        "newer schema_version",
        _with("turn.started", schema_version=2),
        RejectReason.UNSUPPORTED_VERSION,
    ),
    (
        "schema_version as string",
        _with("turn.started", schema_version="1"),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "event_id not a UUID",
        _with("turn.started", event_id="not-a-uuid"),
        RejectReason.SCHEMA_INVALID,
    ),
    ("missing event_id", _with("turn.started", event_id=_DROP), RejectReason.SCHEMA_INVALID),
    (
        "occurred_at without zone",
        _with("turn.started", occurred_at="2026-11-26T09:15:02"),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "occurred_at not a time",
        _with("turn.started", occurred_at="yesterday"),
        RejectReason.SCHEMA_INVALID,
    ),
    ("thread_id zero", _with("turn.started", thread_id=0), RejectReason.SCHEMA_INVALID),
    ("thread_id negative", _with("turn.started", thread_id=-4), RejectReason.SCHEMA_INVALID),
    (
        "thread_id over 2^63-1",
        _with("turn.started", thread_id=MAX_INT64 + 1),
        RejectReason.SCHEMA_INVALID,
    ),
    ("thread_id as string", _with("turn.started", thread_id="4242"), RejectReason.SCHEMA_INVALID),
    ("thread_id as float", _with("turn.started", thread_id=4242.0), RejectReason.SCHEMA_INVALID),
    (
        "search_space_id missing",
        _with("turn.started", search_space_id=_DROP),
        RejectReason.SCHEMA_INVALID,
    ),
    ("user_id not a UUID", _with("turn.started", user_id="alice"), RejectReason.SCHEMA_INVALID),
    ("turn_id too long", _with("turn.started", turn_id="t" * 65), RejectReason.SCHEMA_INVALID),
    ("turn_id empty", _with("turn.started", turn_id=""), RejectReason.SCHEMA_INVALID),
    (
        "turn_id null on turn.started",
        _with("turn.started", turn_id=None),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "turn_id null on turn.finalized",
        _with("turn.finalized", turn_id=None),
        RejectReason.SCHEMA_INVALID,
    ),
    ("user_query missing", _with("turn.started", user_query=_DROP), RejectReason.SCHEMA_INVALID),
    (
        "mentioned_documents not a list",
        _with("turn.started", mentioned_documents={"id": 1}),
        RejectReason.SCHEMA_INVALID,
    ),
    ("content not a list", _with("turn.finalized", content="hello"), RejectReason.SCHEMA_INVALID),
    (
        "content part not an object",
        _with("turn.finalized", content=["hello"]),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "content part without type",
        _with("turn.finalized", content=[{"text": "hi"}]),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "content part type not a string",
        _with("turn.finalized", content=[{"type": 3}]),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "negative prompt_tokens",
        _with("turn.finalized", usage={"calls": [{**_CALL, "prompt_tokens": -1}]}),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "cost over 2^63-1",
        _with("turn.finalized", usage={"calls": [{**_CALL, "cost_micros": MAX_INT64 + 1}]}),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "call without model",
        _with(
            "turn.finalized", usage={"calls": [{k: v for k, v in _CALL.items() if k != "model"}]}
        ),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "usage calls without a user",
        _with("turn.finalized", user_id=None),
        RejectReason.SCHEMA_INVALID,
    ),
    ("usage not an object", _with("turn.finalized", usage=[_CALL]), RejectReason.SCHEMA_INVALID),
    ("unknown role", _with("message.appended", role="robot"), RejectReason.SCHEMA_INVALID),
    (
        "token_usage on a user message",
        _with("message.appended", role="user"),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "negative legacy cost",
        _with("message.appended", token_usage={**_LEGACY_USAGE, "cost_micros": -5}),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "v0 with unknown type",
        _with("message.appended.v0", type="turn.exploded"),
        RejectReason.UNKNOWN_TYPE,
    ),
    (
        "v0 of turn.started",
        _with("message.appended.v0", type="turn.started"),
        RejectReason.SCHEMA_INVALID,
    ),
    ("v0 without role", _with("message.appended.v0", role=_DROP), RejectReason.SCHEMA_INVALID),
    (
        "v0 negative thread_id",
        _with("message.appended.v0", thread_id=-1),
        RejectReason.SCHEMA_INVALID,
    ),
    (
        "negative schema_version",
        _with("turn.started", schema_version=-1),
        RejectReason.SCHEMA_INVALID,
    ),
]


def test_at_least_thirty_distinct_bad_inputs() -> None:
    assert len({value for _, value, _ in BAD_INPUTS}) >= 30
    assert len({name for name, _, _ in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize(
    ("value", "reason"), [(v, r) for _, v, r in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS]
)
def test_bad_input_maps_to_its_reason(value: bytes | None, reason: RejectReason) -> None:
    result = decode_event(value, timestamp_ms=TS)
    assert isinstance(result, Rejection)
    assert result.reason is reason, result.detail
    assert 0 < len(result.detail) <= 1024


SECRET_TEXT = "the customer's secret plan 4711"


@pytest.mark.parametrize(
    "value",
    [
        _with("turn.started", user_query=SECRET_TEXT, thread_id=-1),
        _with("turn.finalized", content=[{"type": 1, "text": SECRET_TEXT}]),
        _with("turn.started", event_id=SECRET_TEXT),
        _with("turn.started", user_id=SECRET_TEXT),
        _with("message.appended", role=SECRET_TEXT),
        _with("turn.started", turn_id=SECRET_TEXT * 5),
        _with("turn.started", type=SECRET_TEXT) + b"x",
    ],
)
def test_rejection_detail_never_quotes_the_input(value: bytes) -> None:
    result = decode_event(value, timestamp_ms=TS)
    assert isinstance(result, Rejection)
    assert "secret" not in result.detail and "4711" not in result.detail


def test_detail_names_the_field_and_rule() -> None:
    result = decode_event(_with("turn.started", turn_id="t" * 65), timestamp_ms=TS)
    assert isinstance(result, Rejection)
    assert "turn_id" in result.detail and "max_length=64" in result.detail


def test_size_limit_is_configurable() -> None:
    value = example_bytes("turn.started")
    assert isinstance(decode_event(value, timestamp_ms=TS, max_bytes=len(value)), TurnStarted)
    rejected = decode_event(value, timestamp_ms=TS, max_bytes=len(value) - 1)
    assert isinstance(rejected, Rejection) and rejected.reason is RejectReason.TOO_LARGE


def test_escaped_backslash_before_u0000_is_text_not_nul() -> None:
    value = _with("turn.started", user_query="C:\\u0000dir")  # a backslash, then "u0000"
    event = decode_event(value, timestamp_ms=TS)
    assert isinstance(event, TurnStarted) and event.user_query == "C:\\u0000dir"


def test_the_examples_decode_to_their_types() -> None:
    kinds = {
        "turn.started": TurnStarted,
        "turn.finalized": TurnFinalized,
        "message.appended": MessageAppended,
        "message.appended.v0": MessageAppended,
    }
    for name in EXAMPLE_NAMES:
        assert isinstance(decode_event(example_bytes(name), timestamp_ms=TS), kinds[name]), name


@pytest.mark.skipif(
    not SHARED_EXAMPLES_DIR.is_dir() and not os.environ.get("CI"),
    reason="no ../shared beside this checkout to compare the copied examples with"
    " (CI always has it, and there a missing ../shared fails this test)",
)
def test_copied_examples_match_the_shared_contract() -> None:
    for name in EXAMPLE_NAMES:
        assert (EXAMPLES_DIR / f"{name}.json").read_bytes() == (
            SHARED_EXAMPLES_DIR / f"{name}.json"
        ).read_bytes()


TRICKY_TEXTS = [
    "héllo wörld — ünïcödé",
    "emoji 🚀👩‍👩‍👧 and flags 🇫🇷",
    "'; DROP TABLE chat_messages; -- $1 %s {} \\ \" ` $$",
    "tabs\tand\nnewlines\r\n and \u2028 separators",
    "right-to-left \u202e text and zero\u200bwidth",
    "x" * 100_000,
    "数据库事务" * 10_000,
]


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=lambda t: t[:20])
def test_text_round_trips_exactly(text: str) -> None:
    started = decode_event(_with("turn.started", user_query=text), timestamp_ms=TS)
    assert isinstance(started, TurnStarted)
    assert started.user_query == text
    content = [{"type": "text", "text": text, "meta": {"note": text}}]
    finalized = decode_event(_with("turn.finalized", content=content), timestamp_ms=TS)
    assert isinstance(finalized, TurnFinalized)
    assert [part.model_dump() for part in finalized.content] == content
    again = decode_event(encode_event(finalized), timestamp_ms=TS)
    assert again == finalized


def test_encode_decode_round_trip_of_every_example() -> None:
    for name in EXAMPLE_NAMES:
        event = decode_event(example_bytes(name), timestamp_ms=TS)
        assert not isinstance(event, Rejection)
        assert decode_event(encode_event(event), timestamp_ms=TS) == event


@pytest.mark.parametrize(
    ("value", "event_type"),
    [
        (_with("turn.finalized", content=[{"type": 1}]), "turn.finalized"),  # schema_invalid
        (_with("turn.started", schema_version=2), "turn.started"),  # unsupported_version
        (_with("message.appended", role="robot"), "message.appended"),
        (_with("turn.started", occurred_at="2026-11-26T12:00:00Z"), "turn.started"),  # future
        (_with("turn.started", type="turn.exploded"), None),  # unknown_type
        (_with("turn.started", type=["turn.started"]), None),  # not a string
        (b'["turn.started"]', None),  # not an object
        (b'{"type":"turn.started",', None),  # invalid_json: nothing names a type
    ],
)
def test_a_rejection_names_the_type_the_record_does(value: bytes, event_type: str | None) -> None:
    """events_total{type, outcome="dead_lettered"} is labelled by it; "unknown" only when the
    record names no type of ours."""
    result = decode_event(value, timestamp_ms=TS)
    assert isinstance(result, Rejection)
    assert result.event_type == event_type, result


# -- the batch decoder: a value seen before in the batch is decoded once ----------------------


def test_batch_decoder_gives_what_decode_event_gives_for_simulated_traffic() -> None:
    """The simulator's mix (exact re-sends, v0 bodies re-sent, poison) with each value also
    delivered again an hour later and a day earlier: record for record, the same result."""
    planned, _ = plan_traffic(TrafficConfig(threads=40, seed=5))  # occurred around now
    now = int(time.time() * 1000)
    stamped = [(value, now + i) for i, (_, value) in enumerate(planned)]
    stamped += [(value, ts + 3_600_000) for value, ts in stamped[::3]]
    stamped += [(value, ts - 86_400_000) for value, ts in stamped[::5]]
    skew = timedelta(hours=1)
    decode = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=skew)
    unknown: dict[str, int] = {}
    shared = 0
    firsts: dict[bytes, object] = {}
    for value, ts in stamped:
        got = decode(value, ts)
        alone = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=skew)
        event = decode_event(value, timestamp_ms=ts)
        reference = event if isinstance(event, Rejection) else ledger_event(event)
        assert got == alone(value, ts) == reference, value
        for kind, count in alone.unknown_fields.items():
            unknown[kind] = unknown.get(kind, 0) + count
        shared += value in firsts and got is firsts[value]
        firsts.setdefault(value, got)
    assert decode.unknown_fields == unknown and unknown  # every record counted, repeats too
    assert shared > len(planned) // 4  # the point: re-sent values were not decoded again


def test_batch_decoder_judges_future_skew_per_record() -> None:
    value = example_bytes("turn.started")
    decode = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=timedelta(hours=1))
    first = decode(value, TS)
    assert isinstance(first, LedgerEvent) and first.type == "turn.started"
    # The same value, produced two hours before the event's occurred_at: in the future.
    early = decode(value, TS - 2 * 3_600_000)
    assert isinstance(early, Rejection)
    assert early.reason is RejectReason.OCCURRED_AT_IN_FUTURE
    assert decode(value, TS) is first


def test_batch_decoder_upcasts_a_v0_body_per_record_timestamp() -> None:
    value = example_bytes("message.appended.v0")
    decode = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=None)
    first, again = decode(value, TS), decode(value, TS + 1_000)
    assert isinstance(first, LedgerEvent) and isinstance(again, LedgerEvent)
    assert again.occurred_at - first.occurred_at == timedelta(seconds=1)
    assert again.event_id == first.event_id  # the body's uuid5, whatever the record time
