"""The chaos run's poison corpus: at least 30 distinct kinds covering every dead-letter reason,
and each kind decided at decoding is the reason it claims (the others are decided against the
ledger: a thread of another tenant, an event_id conflict, a database refusal)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

from consumer.simulate.config import PoisonContext
from producer.decoding import decode_event
from producer.events import Rejection, RejectReason
from tests.chaos.poison import CORPUS, MAX_EVENT_BYTES, PoisonDraws
from tests.factories import START

APPLY_TIME = {
    RejectReason.THREAD_SEARCH_SPACE_MISMATCH,
    RejectReason.EVENT_ID_CONFLICT,
    RejectReason.DATABASE_REJECTED,
}


def _context() -> PoisonContext:
    envelope = {
        "schema_version": 1,
        "thread_id": 77,
        "search_space_id": 3,
        "user_id": str(uuid.uuid4()),
    }
    turnless = [
        {
            **envelope,
            "type": "message.appended",
            "event_id": str(uuid.uuid4()),
            "occurred_at": START.isoformat(),
            "turn_id": None,
            "role": role,
            "content": [{"type": "text", "text": "hi"}],
        }
        for role in ("user", "assistant")
    ]
    return PoisonContext(envelope, START, turnless)


def test_every_reason_and_thirty_distinct_kinds() -> None:
    assert {poison.reason for poison in CORPUS} == set(RejectReason)
    assert len({poison.name for poison in CORPUS}) == len(CORPUS) >= 30


def test_each_kind_is_rejected_for_its_reason() -> None:
    rng, context = random.Random(1), _context()
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    values = set()
    for poison in CORPUS:
        value = poison.build(rng, context, "canary chat text")
        assert value is not None, poison.name
        values.add(value)
        decoded = decode_event(value, timestamp_ms=now_ms, max_bytes=MAX_EVENT_BYTES)
        if poison.reason in APPLY_TIME:
            assert not isinstance(decoded, Rejection), (poison.name, decoded)
        else:
            assert isinstance(decoded, Rejection), poison.name
            assert decoded.reason is poison.reason, (poison.name, decoded)
    assert len(values) == len(CORPUS)


def test_draws_meet_every_reason_first_and_remember_it() -> None:
    draws, rng = PoisonDraws("canary"), random.Random(2)
    bare = PoisonContext(_context().envelope, START, [])
    drawn = [draws(rng, bare) for _ in range(12)]
    assert all(value is not None for value in drawn)
    # Without a turn-less message in the thread, no event_id conflict can be dealt.
    assert {draws.reasons[v] for v in drawn if v is not None} == set(RejectReason) - {
        RejectReason.EVENT_ID_CONFLICT
    }
    value = draws(rng, _context())
    assert value is not None and draws.reasons[value] is RejectReason.EVENT_ID_CONFLICT
