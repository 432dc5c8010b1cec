"""The native decode path (native/, consumer/ledger/native.py) against the reference decoder
(producer/decoding.py + producer/ledger_event.py): on every input where the native path
answers, the same LedgerEvent field by field (the payload compared as the canonical text, so
that `1.0` and `1` differ) and the same count of unknown fields; where it does not, the
reference decides. And the digest is the one the pure-Python encoder gave before."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import token_ledger_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from consumer.ledger import native
from consumer.ledger.decode import BatchDecoder
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from producer import canonical
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


def _canonical(event: LedgerEvent) -> bytes:
    return canonical.ascii_text(event.payload)


def _agrees(value: bytes | None) -> bool:
    """Whether the native path answered; if it did, that it agrees with the reference."""
    reference, _, reference_unknown = decode_value(value, TS, DEFAULT_MAX_EVENT_BYTES)
    answered = native.decode(value, DEFAULT_MAX_EVENT_BYTES, MAX_NESTING) if value else None
    if answered is None:
        return False
    event, unknown = answered
    assert not isinstance(reference, Rejection), (value, reference)
    expected = ledger_event(reference)
    assert event == expected
    assert _canonical(event) == _canonical(expected)
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
    assert event.payload["content"] == document["content"]


REENTRANT = """
import gc
from consumer.ledger import native
from producer.decoding import MAX_NESTING
from tests.examples import example_bytes

value = example_bytes("turn.finalized")
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
    """The payload's allocations can run the collector, and with it a finalizer that decodes
    too (on this thread, or by handing the GIL to another): the inner decode must not wait for
    the outer one's key cache. In a process of its own, since the failure is a hang."""
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
