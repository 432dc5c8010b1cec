"""The chaos run's poison corpus: distinct bad inputs, every reason of the dead-letter
table, each built for the thread it is published in (last, after the thread's good records).

`PoisonDraws` is the simulator's poison source: it deals the corpus round-robin across reasons
(so a short run still meets every reason) and remembers each record it built with the reason
the consumer must give it. Where a kind needs what the thread lacks (an event_id conflict needs
a turn-less message), it declines and the next kind is dealt.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer.simulate.config import PoisonContext
from producer import jsonvalues
from producer.events import RejectReason

# The chaos consumers' LEDGER_MAX_EVENT_BYTES: the too_large kinds are over it, while every
# good record of the simulator (about 540 bytes) is far below.
MAX_EVENT_BYTES = 64 * 1024
# Stands in for any data PostgreSQL refuses (SQLSTATE 23514): the chaos database gets this
# constraint, and the database_rejected kinds carry the marker in their content.
REFUSED_MARKER = "chaos-refused-by-the-database"
REFUSING_CONSTRAINT = (
    "ALTER TABLE chat_messages ADD CONSTRAINT chaos_refuses_marker"
    f" CHECK (content::text NOT LIKE '%{REFUSED_MARKER}%')"
)

Build = Callable[[random.Random, PoisonContext, str], bytes | None]


@dataclass(frozen=True)
class Poison:
    name: str
    reason: RejectReason
    build: Build  # (rng, context, canary chat text) -> the record value, or None: does not fit


def _event_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _started(rng: random.Random, ctx: PoisonContext, query: str, **over: Any) -> dict[str, Any]:
    """A valid turn.started of the thread (a turn of its own), before `over` breaks it."""
    return {
        **ctx.envelope,
        "type": "turn.started",
        "event_id": _event_id(rng),
        "occurred_at": ctx.start.isoformat(),
        "turn_id": f"poison:{rng.getrandbits(40)}",
        "user_query": query,
        "mentioned_documents": [],
        **over,
    }


def _finalized(rng: random.Random, ctx: PoisonContext, text: str, **over: Any) -> dict[str, Any]:
    call = {
        "model": "gpt-4o",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cost_micros": 75,
        "call_kind": "chat",
    }
    return {
        **ctx.envelope,
        "type": "turn.finalized",
        "event_id": _event_id(rng),
        "occurred_at": ctx.start.isoformat(),
        "turn_id": f"poison:{rng.getrandbits(40)}",
        "content": [{"type": "text", "text": text}],
        "usage": {"calls": [call]},
        **over,
    }


def _appended(rng: random.Random, ctx: PoisonContext, text: str, **over: Any) -> dict[str, Any]:
    return {
        **ctx.envelope,
        "type": "message.appended",
        "event_id": _event_id(rng),
        "occurred_at": ctx.start.isoformat(),
        "turn_id": None,
        "role": "user",
        "content": [{"type": "text", "text": text}],
        **over,
    }


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def _future(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


def _with_call(document: dict[str, Any], **call: Any) -> dict[str, Any]:
    calls = [{**document["usage"]["calls"][0], **call}]
    return {**document, "usage": {"calls": calls}}


def _conflict(role: str) -> Build:
    """A turn-less message of the thread again, same event_id, another role: it would need a
    second row (the thread's own, earlier record wins; the same partition keeps the order)."""

    def build(rng: random.Random, ctx: PoisonContext, text: str) -> bytes | None:
        others = [doc for doc in ctx.turnless if doc["role"] != role]
        if not others:
            return None
        original = rng.choice(others)
        document = {k: v for k, v in original.items() if k != "token_usage"}
        return jsonvalues.dumps({**document, "role": role}).encode()

    return build


R = RejectReason
CORPUS: tuple[Poison, ...] = (
    Poison("tombstone", R.EMPTY_VALUE, lambda rng, ctx, text: b""),
    Poison(
        "huge query",
        R.TOO_LARGE,
        lambda rng, ctx, text: _json(_started(rng, ctx, text * (MAX_EVENT_BYTES // len(text)))),
    ),
    Poison("huge garbage", R.TOO_LARGE, lambda rng, ctx, text: b"x" * (MAX_EVENT_BYTES + 1)),
    Poison(
        "thousands of parts",
        R.TOO_LARGE,
        lambda rng, ctx, text: _json(
            _finalized(rng, ctx, text, content=[{"type": "text", "text": text}] * 3000)
        ),
    ),
    Poison("binary", R.INVALID_UTF8, lambda rng, ctx, text: b"\xff\xfe not utf-8"),
    Poison(
        "latin-1 query",
        R.INVALID_UTF8,
        lambda rng, ctx, text: _json(_started(rng, ctx, "cafe")).replace(b"cafe", b"caf\xe9"),
    ),
    Poison(
        "cut multibyte",
        R.INVALID_UTF8,
        lambda rng, ctx, text: _json(_started(rng, ctx, "euro")).replace(b"euro", b"\xe2\x82"),
    ),
    Poison(
        "raw NUL",
        R.NUL_CHARACTER,
        lambda rng, ctx, text: _json(_started(rng, ctx, "nul")).replace(b"nul", b"n\x00l"),
    ),
    Poison(
        "escaped NUL in a query",
        R.NUL_CHARACTER,
        lambda rng, ctx, text: _json(_started(rng, ctx, f"{text} \u0000")),
    ),
    Poison(
        "escaped NUL in content",
        R.NUL_CHARACTER,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, f"\u0000{text}")),
    ),
    Poison("not json", R.INVALID_JSON, lambda rng, ctx, text: b"{not json"),
    Poison(
        "NaN tokens",
        R.INVALID_JSON,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text)).replace(
            b'"total_tokens": 15', b'"total_tokens": NaN'
        ),
    ),
    Poison(
        "Infinity cost",
        R.INVALID_JSON,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text)).replace(
            b'"cost_micros": 75', b'"cost_micros": -Infinity'
        ),
    ),
    Poison(
        "lone surrogate",
        R.INVALID_JSON,
        lambda rng, ctx, text: _json(_started(rng, ctx, "sur")).replace(b"sur", b"\\ud800"),
    ),
    Poison(
        "nested too deep",
        R.INVALID_JSON,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text)).replace(
            b'"content": [', b'"content": [' + b"[" * 2000 + b"]" * 2000 + b",", 1
        ),
    ),
    Poison(
        "number past numeric",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text)).replace(
            b'"type": "text"', b'"type": "text", "x": 1e1000000', 1
        ),
    ),
    Poison(  # PostgreSQL would print it as 4,401 digits: more than Python reads back
        "number past the digits every path reads",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text)).replace(
            b'"type": "text"', b'"type": "text", "latency": 1e4400', 1
        ),
    ),
    Poison(
        "unknown type",
        R.UNKNOWN_TYPE,
        lambda rng, ctx, text: _json(_started(rng, ctx, text, type="turn.exploded")),
    ),
    Poison(
        "deleted message",
        R.UNKNOWN_TYPE,
        lambda rng, ctx, text: _json(_appended(rng, ctx, text, type="message.deleted")),
    ),
    Poison(
        "version 7",
        R.UNSUPPORTED_VERSION,
        lambda rng, ctx, text: _json(_started(rng, ctx, text, schema_version=7)),
    ),
    Poison(
        "version 2 finalize",
        R.UNSUPPORTED_VERSION,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text, schema_version=2)),
    ),
    Poison(
        "negative thread",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_started(rng, ctx, text, thread_id=-4)),
    ),
    Poison(
        "negative tokens",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_with_call(_finalized(rng, ctx, text), prompt_tokens=-1)),
    ),
    Poison(
        "cost past int64",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_with_call(_finalized(rng, ctx, text), cost_micros=2**63)),
    ),
    Poison(
        "calls without a user",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, text, user_id=None)),
    ),
    Poison(
        "year 10000",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(
            _started(rng, ctx, text, occurred_at="10000-01-01T00:00:00+00:00")
        ),
    ),
    Poison(
        "no event_id",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(
            {k: v for k, v in _started(rng, ctx, text).items() if k != "event_id"}
        ),
    ),
    Poison(
        "usage on a user message",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(
            _appended(rng, ctx, text, token_usage={"prompt_tokens": 1, "total_tokens": 1})
        ),
    ),
    Poison(
        "turn_id of 65",
        R.SCHEMA_INVALID,
        lambda rng, ctx, text: _json(_started(rng, ctx, text, turn_id="t" * 65)),
    ),
    Poison(
        "two hours ahead",
        R.OCCURRED_AT_IN_FUTURE,
        lambda rng, ctx, text: _json(
            _started(rng, ctx, text, occurred_at=_future(timedelta(hours=2)))
        ),
    ),
    Poison(
        "a month ahead",
        R.OCCURRED_AT_IN_FUTURE,
        lambda rng, ctx, text: _json(
            _finalized(rng, ctx, text, occurred_at=_future(timedelta(days=30)))
        ),
    ),
    Poison(
        "year 9999",
        R.OCCURRED_AT_IN_FUTURE,
        lambda rng, ctx, text: _json(
            _appended(rng, ctx, text, occurred_at="9999-12-31T23:59:59+00:00")
        ),
    ),
    Poison(
        "another tenant's turn",
        R.THREAD_SEARCH_SPACE_MISMATCH,
        lambda rng, ctx, text: _json(
            _started(rng, ctx, text, search_space_id=ctx.envelope["search_space_id"] + 10_000)
        ),
    ),
    Poison(
        "another tenant's append",
        R.THREAD_SEARCH_SPACE_MISMATCH,
        lambda rng, ctx, text: _json(
            _appended(rng, ctx, text, search_space_id=ctx.envelope["search_space_id"] + 20_000)
        ),
    ),
    Poison("event_id as a system message", R.EVENT_ID_CONFLICT, _conflict("system")),
    Poison("event_id as an assistant message", R.EVENT_ID_CONFLICT, _conflict("assistant")),
    Poison("event_id as a user message", R.EVENT_ID_CONFLICT, _conflict("user")),
    Poison(
        "refused query",
        R.DATABASE_REJECTED,
        lambda rng, ctx, text: _json(_started(rng, ctx, f"{text} {REFUSED_MARKER}")),
    ),
    Poison(
        "refused answer",
        R.DATABASE_REJECTED,
        lambda rng, ctx, text: _json(_finalized(rng, ctx, f"{REFUSED_MARKER} {text}")),
    ),
    Poison(
        "refused append",
        R.DATABASE_REJECTED,
        lambda rng, ctx, text: _json(_appended(rng, ctx, REFUSED_MARKER)),
    ),
)


class PoisonDraws:
    """The simulator's poison source over CORPUS; `reasons` maps each value it built to the
    reason its dead letter must carry."""

    def __init__(self, canary_text: str) -> None:
        self.canary_text = canary_text
        self.reasons: dict[bytes, RejectReason] = {}
        self.names: dict[bytes, str] = {}
        self._deck: deque[Poison] | None = None

    def _deal(self, rng: random.Random) -> deque[Poison]:
        # Round-robin across reasons, each reason's kinds shuffled: every reason early.
        by_reason: dict[RejectReason, list[Poison]] = {}
        for poison in CORPUS:
            by_reason.setdefault(poison.reason, []).append(poison)
        for kinds in by_reason.values():
            rng.shuffle(kinds)
        order: list[Poison] = []
        while any(by_reason.values()):
            order += [kinds.pop() for kinds in by_reason.values() if kinds]
        return deque(order)

    def __call__(self, rng: random.Random, context: PoisonContext) -> bytes | None:
        if self._deck is None:
            self._deck = self._deal(rng)
        for index, poison in enumerate(self._deck):
            value = poison.build(rng, context, self.canary_text)
            if value is None:
                continue  # it stays in front: dealt at the next thread that fits
            del self._deck[index]
            self._deck.append(poison)
            self.reasons[value] = poison.reason
            self.names[value] = poison.name
            return value
        return None
