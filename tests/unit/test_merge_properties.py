"""Merge rules, pure: any permutation or duplication of the same events gives the same
ledger, and it equals the plainly written reference."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.ledger import expected_rows, rebuild
from consumer.merge import Outcome, StoredState, reduce_batch
from producer.events import AnyEvent, payload_digest
from tests.reference import reference_rows
from tests.strategies import delivered


@settings(max_examples=400, deadline=None)
@given(delivered())
def test_rebuild_equals_the_reference(events: list[AnyEvent]) -> None:
    assert expected_rows(rebuild(events)) == reference_rows(events)


@settings(max_examples=200, deadline=None)
@given(delivered(reused_ids=False), st.randoms(use_true_random=False))
def test_order_and_duplicates_do_not_matter(events: list[AnyEvent], rng: random.Random) -> None:
    shuffled = list(events) + list(events[: len(events) // 2])
    rng.shuffle(shuffled)
    assert expected_rows(rebuild(shuffled)) == expected_rows(rebuild(events))


@settings(max_examples=200, deadline=None)
@given(delivered(consistent_spaces=False))
def test_conflicting_spaces_follow_arrival_order(events: list[AnyEvent]) -> None:
    assert expected_rows(rebuild(events)) == reference_rows(events)


@settings(max_examples=100, deadline=None)
@given(delivered())
def test_every_event_gets_one_outcome_and_repeats_are_duplicates(events: list[AnyEvent]) -> None:
    plan = reduce_batch(events, StoredState())
    assert len(plan.outcomes) == len(events)
    seen = set()
    for event, outcome in zip(events, plan.outcomes, strict=True):
        # Only an exact copy is a duplicate; a differing copy of an event_id competes.
        # (A copy of a rejected event is judged again, and rejected again.)
        copy = (event.event_id, event.occurred_at, payload_digest(event))
        if copy in seen:
            assert outcome is Outcome.DUPLICATE
        if outcome is not Outcome.REJECTED:
            seen.add(copy)


@settings(max_examples=100, deadline=None)
@given(delivered(), st.randoms(use_true_random=False))
def test_a_repeated_object_is_judged_like_an_equal_copy(
    events: list[AnyEvent], rng: random.Random
) -> None:
    """The batch decoder hands out one object for a value delivered twice; reduce_batch
    recognises it without a digest, and must decide exactly as for two equal objects."""
    repeats = [rng.choice(events) for _ in range(len(events) // 2 + 1)]
    batch = list(events) + repeats
    rng.shuffle(batch)
    as_copies = [event.model_copy() for event in batch]
    assert reduce_batch(batch, StoredState()) == reduce_batch(as_copies, StoredState())
