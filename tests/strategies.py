"""Hypothesis strategies: small universes of events, so that keys, times and users collide.

Beyond well-formed traffic they draw what real producers send: loose legacy breakdowns,
fields this consumer does not know (in calls, content parts and the envelope, some through
the wire decoder), numbers beyond float precision in content, and differing copies of one
event_id (re-stamped retries, changed payloads, v0 bodies re-sent with a later timestamp).
"""

from __future__ import annotations

import itertools
import uuid
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from producer import jsonvalues
from producer.decoding import decode_event
from producer.events import USAGE_MEASURES, AnyEvent, MessageAppended, Rejection
from tests.factories import appended, at, call, finalized, started

THREADS = (1, 2)
TURNS = ("1:a", "1:b", "2:a")
USERS = (uuid.UUID(int=1), uuid.UUID(int=2), None)
seconds = st.integers(min_value=0, max_value=4)  # few distinct instants: ties happen
event_ids = st.uuids(version=4)
texts = st.sampled_from(["", "hi", "héllo 🚀", "'; DROP TABLE x; --"])
exact_numbers = st.sampled_from(
    [Decimal("12345678901234567890.123"), Decimal("0.1"), Decimal("1E+400"), 2**70, -7]
)
content = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "tool-call"]), "text": texts}),
        st.fixed_dictionaries({"type": st.just("chart"), "value": exact_numbers}),
    ),
    max_size=2,
)
documents = st.lists(
    st.fixed_dictionaries(
        {"id": st.integers(1, 3)},
        optional={"title": texts, "document_type": st.sampled_from(["FILE", None])},
    ),
    max_size=3,
)
calls = st.lists(
    st.builds(
        call,
        model=st.sampled_from(["m1", "m2"]),
        prompt=st.integers(0, 9),
        completion=st.integers(0, 9),
        total=st.integers(0, 18),
        cost=st.integers(0, 99),
        # Token kinds (summed per model into the breakdown), a field not known yet (kept).
        cached_tokens=st.one_of(st.none(), st.integers(0, 9)),
        audio_tokens=st.integers(0, 9),
    ),
    max_size=2,
)
# Legacy per-model breakdowns as frontends send them: missing, empty, or any subset of the
# measures per model (not necessarily adding up to the totals).
breakdowns: st.SearchStrategy[Any] = st.one_of(
    st.just("full"),
    st.none(),
    st.just({}),
    st.dictionaries(
        st.sampled_from(["m1", "m2"]),
        st.dictionaries(st.sampled_from(USAGE_MEASURES), st.integers(0, 20), max_size=4),
        max_size=2,
    ),
)


def _thread(consistent_spaces: bool) -> st.SearchStrategy[dict[str, int]]:
    """A thread and its search space: always the same one, or (to test rejection) either."""

    def make(thread_id: int) -> st.SearchStrategy[dict[str, int]]:
        space = st.just(thread_id) if consistent_spaces else st.sampled_from([1, 2])
        return st.fixed_dictionaries({"thread_id": st.just(thread_id), "space": space})

    return st.sampled_from(THREADS).flatmap(make)


# Instants either side of a day's and a month's end (T0 is 2026-11-26 09:15 UTC): usage that a
# supersession moves to another day or month.
MIDNIGHT = 53_100  # 2026-11-27 00:00:00
MONTH_END = MIDNIGHT + 4 * 86_400  # 2026-12-01 00:00:00
across_periods = st.sampled_from(
    [0, MIDNIGHT - 1, MIDNIGHT - 0.001, MIDNIGHT, MIDNIGHT + 1, MONTH_END - 1, MONTH_END]
)


def events(
    consistent_spaces: bool = True, instants: st.SearchStrategy[float] = seconds
) -> st.SearchStrategy[AnyEvent]:
    where = _thread(consistent_spaces)
    common = {
        "seconds": instants,
        "user": st.sampled_from(USERS),
        "event_id": event_ids,
        "turn_id": st.sampled_from(TURNS),
    }
    start = st.builds(started, query=texts, documents=documents, **common)
    # Billable usage needs a user: calls only with a user_id.
    final = st.sampled_from(USERS).flatmap(
        lambda user: st.builds(
            finalized,
            content=content,
            calls=st.one_of(st.none(), calls) if user else st.none(),
            **{**common, "user": st.just(user)},
        )
    )
    legacy = st.sampled_from(["user", "assistant", "system"]).flatmap(
        lambda role: st.builds(
            appended,
            role=st.just(role),
            content=content,
            cost=st.one_of(st.none(), st.integers(0, 99)) if role == "assistant" else st.none(),
            breakdown=breakdowns,
            **{**common, "turn_id": st.sampled_from([*TURNS, None])},
        )
    )

    def place(event: AnyEvent, where: dict[str, int], wire: bool) -> AnyEvent:
        placed = event.model_copy(
            update={"thread_id": where["thread_id"], "search_space_id": where["space"]}
        )
        return through_the_wire(placed) if wire else placed

    return st.builds(place, st.one_of(start, final, legacy), where, st.booleans())


PUBLISHED_MS = int(at(MONTH_END + 3600).timestamp() * 1000)  # after every drawn occurred_at


def through_the_wire(event: AnyEvent) -> AnyEvent:
    """The event as a newer producer would publish it (unknown fields in the envelope and
    the usage object), decoded by the consumer's decoder."""
    body: dict[str, Any] = jsonvalues.loads(jsonvalues.dumps(event.model_dump()))
    body["trace_id"] = "abc"  # ignored, counted
    if isinstance(body.get("usage"), dict):
        body["usage"]["currency"] = "USD"
    if isinstance(body.get("token_usage"), dict):
        body["token_usage"]["currency"] = "USD"
    decoded = decode_event(jsonvalues.dumps(body).encode(), timestamp_ms=PUBLISHED_MS)
    assert not isinstance(decoded, Rejection), decoded
    return decoded


def v0_copy(event: MessageAppended, seconds: int) -> AnyEvent:
    """The append as the legacy frontend's v0 body, published at `seconds`: its event_id
    derives from the body, its occurred_at is the record's timestamp."""
    body: dict[str, Any] = jsonvalues.loads(jsonvalues.dumps(event.model_dump(exclude_unset=True)))
    for name in ("event_id", "occurred_at"):
        body.pop(name)
    body["schema_version"] = 0
    decoded = decode_event(
        jsonvalues.dumps(body).encode(), timestamp_ms=int(at(seconds).timestamp() * 1000)
    )
    assert not isinstance(decoded, Rejection), decoded
    return decoded


@st.composite
def differing_copies(
    draw: st.DrawFn, base: list[AnyEvent], reused_ids: bool = True
) -> list[AnyEvent]:
    """Copies of some events under the same event_id that are NOT exact: re-stamped, with
    another payload, or (legacy appends) a v0 body re-sent later; with `reused_ids`, also a
    turn-less message's event_id reused in another thread (event_id_conflict, which arrival
    order decides)."""
    copies: list[AnyEvent] = []
    ways = ["restamp", "payload", "v0", "rekey"] if reused_ids else ["restamp", "payload", "v0"]
    for event in draw(st.lists(st.sampled_from(base), max_size=3)) if base else []:
        how = draw(st.sampled_from(ways))
        if how == "rekey" and isinstance(event, MessageAppended) and event.turn_id is None:
            # The same event_id for a turn-less message elsewhere: event_id_conflict.
            other = next(t for t in THREADS if t != event.thread_id)
            copies.append(event.model_copy(update={"thread_id": other, "search_space_id": other}))
        elif how == "restamp":
            copies.append(event.model_copy(update={"occurred_at": at(draw(seconds))}))
        elif how == "payload" and isinstance(event, MessageAppended):
            copies.append(event.model_copy(update={"content": [], "role": event.role}))
        elif how == "payload":
            copies.append(event.model_copy(update={"user_id": draw(st.sampled_from(USERS))}))
        elif isinstance(event, MessageAppended):
            later = draw(seconds)
            copies += [v0_copy(event, draw(seconds)), v0_copy(event, later)]
    return copies


def with_duplicates(draw: st.DrawFn, base: list[AnyEvent]) -> list[AnyEvent]:
    """The events plus redeliveries of some of them, in a random order."""
    repeats = draw(st.lists(st.sampled_from(base), max_size=len(base))) if base else []
    return draw(st.permutations(base + repeats))


@st.composite
def delivered(
    draw: st.DrawFn,
    consistent_spaces: bool = True,
    reused_ids: bool = True,
    instants: st.SearchStrategy[float] = seconds,
) -> list[AnyEvent]:
    base = draw(st.lists(events(consistent_spaces, instants), min_size=1, max_size=12))
    return with_duplicates(draw, base + draw(differing_copies(base, reused_ids)))


@st.composite
def batch_splits(draw: st.DrawFn, events_: list[AnyEvent]) -> list[list[AnyEvent]]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(events_) - 1)), max_size=4)))
    bounds = [0, *[c for c in cuts if c < len(events_)], len(events_)]
    return [events_[a:b] for a, b in itertools.pairwise(bounds) if a < b]
