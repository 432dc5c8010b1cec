"""The native decode path (native/, consumer/ledger/native.py) against the reference decoder
(producer/decoding.py + producer/ledger_event.py): on every input where the native path
answers, the same LedgerEvent field by field (its JSON text compared as the value's canonical
text: jsonb keeps neither key order nor spacing, and `1.0` and `1` differ) and the same count
of unknown fields; where it does not, the reference decides. And the digest is the one the
pure-Python encoder gave before."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import token_ledger_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import structs
from pydantic import BaseModel

from consumer.ledger import native
from consumer.ledger.decode import BatchDecoder
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer import canonical, jsonvalues
from producer.decoding import MAX_NESTING, decode_value
from producer.events import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_INT64,
    AnyEvent,
    LegacyTokenUsage,
    MessageAppended,
    ModelUsage,
    Rejection,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
    encode_event,
)
from producer.ledger_event import LedgerEvent, ledger_event
from tests.examples import EXAMPLE_NAMES, example, example_bytes
from tests.factories import START
from tests.mutations import mutated_values
from tests.reference import payload_digest
from tests.strategies import events

TS = int(START.timestamp() * 1000) + 86_400_000


def _json(text: str) -> bytes:
    return canonical.ascii_text(jsonvalues.loads(text))


def _comparable(event: LedgerEvent) -> tuple[object, ...]:
    """The event with its JSON as values (their canonical text, so that `1.0` and `1` differ)."""
    usage = event.usage
    return (
        structs.replace(event, content="", usage=None),
        _json(event.content),
        usage
        and (
            structs.replace(usage, model_breakdown={}, call_details=""),
            canonical.ascii_text(usage.model_breakdown),
            _json(usage.call_details),
        ),
    )


def _agrees(value: bytes | None) -> bool:
    """Whether the native path answered; if it did, that it agrees with the reference."""
    reference, _, reference_unknown = decode_value(value, TS, DEFAULT_MAX_EVENT_BYTES)
    answered = native.decode(value, DEFAULT_MAX_EVENT_BYTES, MAX_NESTING) if value else None
    if answered is None:
        return False
    event, unknown = answered
    assert not isinstance(reference, Rejection), (value, reference)
    expected = ledger_event(reference)
    assert _comparable(event) == _comparable(expected)
    assert event.digest == payload_digest(reference)
    assert unknown == reference_unknown
    return True


def _wire(event: AnyEvent) -> bytes:
    return encode_event(event)


inputs = st.one_of(
    st.builds(_wire, events()),
    st.builds(_wire, events()).map(
        lambda v: v.replace(b'"schema_version":1', b'"schema_version":1 ')
    ),
    mutated_values(),
    mutated_values(),
    mutated_values(),
    st.binary(max_size=64),
)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
def test_the_native_path_agrees_with_the_reference_on_every_input(value: bytes) -> None:
    _agrees(value)


@pytest.mark.parametrize(
    ("occurred_at", "answered"),
    [
        ("2026-11-26T09:15:00.123456+00:00", True),
        ("2026-11-26T09:15:00.000000+00:00", True),
        ("2026-11-26T09:15:00.100000+00:00", True),
        ("2026-11-26T09:15:00+00:00", True),
        ("2026-11-26T09:15:00.5+00:00", True),
        ("2026-11-26T09:15:00.123456Z", True),
        ("2026-11-26T09:15:00.123456-00:00", True),
        ("2026-11-26T09:15:00.123456+05:30", True),
        ("2026-11-26T09:15:00.123456+00:00\n", False),
        ("2026-11-26T09:15:00.1234567+00:00", False),
        ("\u0662\u0660\u0662\u0666-11-26T09:15:00.123456+00:00", False),
        ("0001-01-01T00:00:00+00:00", False),
    ],
)
def test_the_payload_writes_the_time_as_the_reference_does(
    occurred_at: str, answered: bool
) -> None:
    """Text in the shape `isoformat()` writes is its own payload text; any other is written
    again; a shape the pattern refuses is the reference decoder's to decide."""
    document = example("turn.started") | {"occurred_at": occurred_at}
    assert _agrees(json.dumps(document).encode()) == answered


BOUND = MAX_INT64 // native.CALLS


@pytest.mark.parametrize(
    ("calls", "total_tokens", "answered"),
    [
        (2, BOUND, True),
        (native.CALLS, BOUND, True),
        (2, BOUND + 1, False),  # valid: the reference decoder's
        (1, MAX_INT64, False),  # valid: the reference decoder's
        (native.CALLS + 1, BOUND // 2, False),  # valid: the reference decoder sums them
        (native.CALLS + 1, BOUND, False),  # the sum is past 2^63-1: rejected
    ],
)
def test_the_sums_of_many_calls_or_large_counts_are_checked(
    calls: int, total_tokens: int, answered: bool
) -> None:
    document = example("turn.finalized")
    call = document["usage"]["calls"][0] | {"total_tokens": total_tokens}
    document["usage"]["calls"] = [call] * calls
    assert _agrees(json.dumps(document).encode()) == answered


# Every ASCII character, DEL, and characters of two, three and four UTF-8 bytes.
CHARACTERS = [chr(code) for code in range(1, 0x80)] + ["\x80", "é", "€", "\u2028", "😀"]


@pytest.mark.parametrize("character", CHARACTERS, ids=[f"U+{ord(c):04X}" for c in CHARACTERS])
def test_each_character_at_each_position_is_read_and_written_as_the_reference_does(
    character: str,
) -> None:
    """Text is scanned eight bytes at a time: a character that ends a plain run (a quote, a
    backslash, a control character; past `~` in the digest's ASCII text) is found at every
    position of a word, in the record (escaped or not) and in both texts written from it. A
    turn.started's stored content (parts the rule builds, in its order) is the reference's
    byte for byte; elsewhere the stored text keeps the record's key order, which jsonb does
    not keep, so only its value is the reference's."""
    for position in range(17):
        query = "a" * position + character + "a" * (16 - position)
        for ascii_only in (False, True):
            document = example("turn.started") | {"user_query": query}
            value = json.dumps(document, ensure_ascii=ascii_only).encode()
            assert _agrees(value)
            answered = native.decode(value, DEFAULT_MAX_EVENT_BYTES, MAX_NESTING)
            assert answered is not None
            reference, _, _ = decode_value(value, TS, DEFAULT_MAX_EVENT_BYTES)
            assert not isinstance(reference, Rejection)
            assert answered[0].content == ledger_event(reference).content


def _appended(token_usage: dict[str, object]) -> bytes:
    document = example("message.appended")
    document["token_usage"] = {
        name: value
        for name, value in (document["token_usage"] | token_usage).items()
        if value != "absent"
    }
    return json.dumps(document).encode()


def _finalized(content: list[object], calls: list[dict[str, object]]) -> bytes:
    document = example("turn.finalized")
    document["content"] = content
    document["usage"]["calls"] = [document["usage"]["calls"][0] | call for call in calls]
    return json.dumps(document).encode()


def _started(documents: list[dict[str, object]]) -> bytes:
    return json.dumps(example("turn.started") | {"mentioned_documents": documents}).encode()


STORED_FORMS = {
    "documents: kept with all three fields": _started(
        [{"id": 1, "title": "t", "document_type": "FILE", "extra": [1]}, {"id": 2, "title": "t"}]
    ),
    "documents: a null field drops one": _started(
        [{"id": None, "title": "t", "document_type": "FILE"}]
    ),
    "documents: none kept, no part": _started([{"title": "t"}]),
    "documents: values of any type": _started(
        [{"id": {"a": [1, "é"]}, "title": 'q"\\', "document_type": False}] * 2
    ),
    "finalized: no content is a status part": _finalized([], [{}]),
    "finalized: no calls, no usage": _finalized([{"type": "text", "text": "x"}], []),
    "finalized: calls summed per model, kinds where reported": _finalized(
        [{"type": "text", "text": "x"}],
        [
            {"model": "a", "cached_tokens": 5},
            {"model": "b", "reasoning_tokens": None},
            {"model": "a", "reasoning_tokens": 3, "audio": {"x": 1}},
            {"model": "a", "cached_tokens": 7},
        ],
    ),
    "legacy: bare call list": _appended({}),
    "legacy: call details absent": _appended({"call_details": "absent"}),
    "legacy: call details null": _appended({"call_details": None}),
    "legacy: call details an object": _appended({"call_details": {"calls": [], "x": 1}}),
    "legacy: breakdown absent": _appended({"usage": "absent"}),
    "legacy: breakdown null": _appended({"usage": None}),
    "legacy: breakdown empty": _appended({"usage": {}}),
    "legacy: breakdown partial, with unknown fields": _appended(
        {"usage": {"m": {"prompt_tokens": 1, "note": "x"}, "n": {}}}
    ),
}


@pytest.mark.parametrize("value", STORED_FORMS.values(), ids=STORED_FORMS.keys())
def test_what_the_rows_store_is_the_references(value: bytes) -> None:
    """The stored content and usage (producer/ledger_event.py's rules) on the shapes the
    generated events may miss; each is answered natively."""
    assert _agrees(value)


@settings(max_examples=300, deadline=None)
@given(events())
def test_the_digest_is_the_one_every_release_stored(event: AnyEvent) -> None:
    assert ledger_event(event).digest == payload_digest(event)


MODELS: dict[str, type[BaseModel]] = {
    "turn.started": TurnStarted,
    "turn.finalized": TurnFinalized,
    "message.appended": MessageAppended,
    "usage": TurnUsage,
    "call": UsageCall,
    "legacy": LegacyTokenUsage,
    "entry": ModelUsage,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_native_rules_read_every_field_of_each_model(name: str) -> None:
    """The fields the native rules check and keep are the model's (producer/events.py), field
    for field: a field added to a model without a rule would be dropped from the payload."""
    known = set(token_ledger_native.KNOWN_FIELDS[name])
    if name in ("turn.started", "turn.finalized", "message.appended"):
        known |= set(token_ledger_native.KNOWN_FIELDS["envelope"])
    assert known == set(MODELS[name].model_fields)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(
                st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=6
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=1000, deadline=None)
@given(json_values, st.booleans())
def test_the_native_canonical_text_is_the_digests_text(value: object, ascii_only: bool) -> None:
    """Parsed from any JSON text of it, the native writer gives the value's canonical text
    (producer/canonical.py) byte for byte: sorted keys, ASCII, escapes as json.dumps."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert token_ledger_native.ascii_text(text, MAX_NESTING) == canonical.ascii_text(value)


@pytest.mark.parametrize("keys", [3, 16, 17, 5000])
def test_a_key_written_twice_is_the_references_in_small_and_large_objects(keys: int) -> None:
    """Which copy of a repeated key wins is the reference decoder's rule: the native path
    answers for distinct keys and leaves a repeat to it, in an object of a few keys (checked
    pairwise) or of many (checked sorted, so that a flat object of many keys costs no square)."""
    document = example("turn.started") | {f"k{i:05d}": i for i in range(keys)}
    distinct = json.dumps(document).encode()
    assert _agrees(distinct)
    repeated = distinct[:-1] + b', "k00000": 1}'
    assert native.decode(repeated, DEFAULT_MAX_EVENT_BYTES, MAX_NESTING) is None


def test_nesting_past_the_bound_is_none_however_deep() -> None:
    """The parser bounds its own depth: text nested past it is left to the reference decoder
    (which rejects it), never a stack overflow, whatever a caller passes as the bound."""
    deep = b"[" * 100_000 + b"]" * 100_000
    assert token_ledger_native.ascii_text(deep, MAX_NESTING) is None
    assert token_ledger_native.ascii_text(b"[" * 5 + b"]" * 5, 5) == b"[[[[[]]]]]"
    assert token_ledger_native.ascii_text(b"[" * 6 + b"]" * 6, 5) is None
    assert native.decode(b'{"a":' + deep + b"}", 1 << 22, 10**7) is None


def test_a_record_past_the_native_bound_is_the_references() -> None:
    """However large LEDGER_MAX_EVENT_BYTES allows a record to be, one past the native path's
    bound is decoded by the reference decoder (its peak memory is a quarter of the native's),
    and gives the same event."""
    document = example("turn.finalized")
    document["content"] = [{"type": "text", "text": ""}]
    padding = native.LARGEST - len(json.dumps(document).encode())
    document["content"][0]["text"] = "x" * padding
    largest = json.dumps(document).encode()
    assert len(largest) == native.LARGEST
    assert native.decode(largest, 4 * native.LARGEST, MAX_NESTING) is not None
    document["content"][0]["text"] += "x"
    value = json.dumps(document).encode()
    assert native.decode(value, 4 * native.LARGEST, MAX_NESTING) is None
    decoder = BatchDecoder(max_bytes=4 * native.LARGEST, max_future_skew=None)
    event = decoder(value, TS)
    assert decoder.referred == 1
    assert isinstance(event, LedgerEvent)
    assert jsonvalues.loads(event.content) == document["content"]


REENTRANT = """
import gc
from consumer.ledger import native
from producer.decoding import MAX_NESTING
from tests.examples import example_bytes

value = example_bytes("message.appended")  # its breakdown is made as Python values
answers = []

class Cycle:
    def __init__(self):
        self.me = self

    def __del__(self):
        answers.append(native.decode(value, 1 << 20, MAX_NESTING))

gc.set_threshold(5)
for _ in range(200):
    Cycle()
    answers.append(native.decode(value, 1 << 20, MAX_NESTING))
assert len({answer[0].digest for answer in answers}) == 1, answers
print(len(answers))
"""


def test_a_decode_that_a_finalizer_starts_inside_a_decode_finishes() -> None:
    """A decode's allocations can run the collector, and with it a finalizer that decodes too
    (on this thread, or by handing the GIL to another): the inner decode finishes and both
    give the same event. In a process of its own, since a failure would be a hang."""
    finished = subprocess.run(
        [sys.executable, "-c", REENTRANT], capture_output=True, text=True, timeout=120, check=False
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert int(finished.stdout) > 200  # the finalizers decoded too


def test_a_decoder_needs_a_positive_bound_on_calls() -> None:
    with pytest.raises(ValueError, match="calls must be at least 1"):
        token_ledger_native.Decoder(
            started=[],
            finalized=[],
            appended=[],
            usage=[],
            call=[],
            legacy=[],
            entry=[],
            measures=[],
            kinds=[],
            max=MAX_INT64,
            calls=0,
        )


def test_the_native_path_takes_the_shapes_producers_write() -> None:
    """Every example of the contract but the v0 body, and the simulator's current-version
    traffic, never reach the reference decoder: that is where the cost goes down."""
    for name in EXAMPLE_NAMES:
        assert _agrees(example_bytes(name)) == (not name.endswith(".v0")), name
    planned, _ = plan_traffic(TrafficConfig(threads=60, seed=3, start=START))
    decoder = BatchDecoder(max_bytes=DEFAULT_MAX_EVENT_BYTES, max_future_skew=None)
    kinds: Counter[str] = Counter()
    for _, value in planned:
        referred = decoder.referred
        result = decoder(value, TS)
        if decoder.referred > referred:
            document = json.loads(value) if value and value[:1] == b"{" else None
            version = document.get("schema_version") if isinstance(document, dict) else None
            kinds[
                "v0" if version == 0 else "rejected" if isinstance(result, Rejection) else "v1"
            ] += 1
    assert kinds["v1"] == 0, kinds
