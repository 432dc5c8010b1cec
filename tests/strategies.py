"""Hypothesis strategies: small universes of events, so that keys, times and users collide."""

from __future__ import annotations

import itertools
import uuid

from hypothesis import strategies as st

from producer.events import AnyEvent
from tests.factories import appended, call, finalized, started

THREADS = (1, 2)
TURNS = ("1:a", "1:b", "2:a")
USERS = (uuid.UUID(int=1), uuid.UUID(int=2), None)
seconds = st.integers(min_value=0, max_value=4)  # few distinct instants: ties happen
event_ids = st.uuids(version=4)
texts = st.sampled_from(["", "hi", "héllo 🚀", "'; DROP TABLE x; --"])
content = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "tool-call"]), "text": texts}),
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
    ),
    max_size=2,
)


def _thread(consistent_spaces: bool) -> st.SearchStrategy[dict[str, int]]:
    """A thread and its search space: always the same one, or (to test rejection) either."""

    def make(thread_id: int) -> st.SearchStrategy[dict[str, int]]:
        space = st.just(thread_id) if consistent_spaces else st.sampled_from([1, 2])
        return st.fixed_dictionaries({"thread_id": st.just(thread_id), "space": space})

    return st.sampled_from(THREADS).flatmap(make)


def events(consistent_spaces: bool = True) -> st.SearchStrategy[AnyEvent]:
    where = _thread(consistent_spaces)
    common = {
        "seconds": seconds,
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
            **{**common, "turn_id": st.sampled_from([*TURNS, None])},
        )
    )

    def place(event: AnyEvent, where: dict[str, int]) -> AnyEvent:
        return event.model_copy(
            update={"thread_id": where["thread_id"], "search_space_id": where["space"]}
        )

    return st.builds(place, st.one_of(start, final, legacy), where)


def with_duplicates(draw: st.DrawFn, base: list[AnyEvent]) -> list[AnyEvent]:
    """The events plus redeliveries of some of them, in a random order."""
    repeats = draw(st.lists(st.sampled_from(base), max_size=len(base))) if base else []
    return draw(st.permutations(base + repeats))


@st.composite
def delivered(draw: st.DrawFn, consistent_spaces: bool = True) -> list[AnyEvent]:
    base = draw(st.lists(events(consistent_spaces), min_size=1, max_size=12))
    return with_duplicates(draw, base)


@st.composite
def batch_splits(draw: st.DrawFn, events_: list[AnyEvent]) -> list[list[AnyEvent]]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(events_) - 1)), max_size=4)))
    bounds = [0, *[c for c in cuts if c < len(events_)], len(events_)]
    return [events_[a:b] for a, b in itertools.pairwise(bounds) if a < b]
