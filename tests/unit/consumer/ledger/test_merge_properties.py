"""Merge rules, pure: any permutation or duplication of the same events gives the same
ledger, and it equals the plainly written reference."""

from __future__ import annotations

import random
from itertools import groupby
from operator import itemgetter
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.ledger.claims import Outcome, StoredMessage, StoredState, event_rows
from consumer.ledger.merge import Admission, reduce_batch
from consumer.ledger.rebuild import LedgerRows, expected_rows, rebuild, rebuild_by_thread
from producer.events import AnyEvent
from producer.ledger_event import ledger_event
from tests.factories import ledger_events
from tests.reference import reference_rows
from tests.strategies import delivered


@settings(max_examples=400, deadline=None)
@given(delivered())
def test_rebuild_equals_the_reference(events: list[AnyEvent]) -> None:
    assert expected_rows(rebuild(ledger_events(events))) == reference_rows(events)


@settings(max_examples=200, deadline=None)
@given(delivered(reused_ids=False), st.randoms(use_true_random=False))
def test_order_and_duplicates_do_not_matter(events: list[AnyEvent], rng: random.Random) -> None:
    shuffled = list(events) + list(events[: len(events) // 2])
    rng.shuffle(shuffled)
    assert expected_rows(rebuild(ledger_events(shuffled))) == expected_rows(
        rebuild(ledger_events(events))
    )


@settings(max_examples=200, deadline=None)
@given(delivered(consistent_spaces=False))
def test_conflicting_spaces_follow_arrival_order(events: list[AnyEvent]) -> None:
    assert expected_rows(rebuild(ledger_events(events))) == reference_rows(events)


@settings(max_examples=300, deadline=None)
@given(delivered(consistent_spaces=False))
def test_thread_by_thread_after_admission_equals_the_whole_rebuild(events: list[AnyEvent]) -> None:
    """What verify does: admit every event in arrival order (the order-dependent rules), regroup
    the admitted ones by thread keeping their order, fold each thread alone."""
    admission = Admission(StoredState())
    admitted = [
        (event.thread_id, arrival, event)
        for arrival, event in enumerate(events)
        if admission.check(ledger_event(event)) is None
    ]
    admitted.sort(key=itemgetter(0, 1))
    groups = (
        (thread_id, (ledger_event(event) for _, _, event in group))
        for thread_id, group in groupby(admitted, key=itemgetter(0))
    )
    whole = LedgerRows(threads={}, messages={}, usage={})
    thread_ids = []
    for thread_id, rows in rebuild_by_thread(groups):
        thread_ids.append(thread_id)
        assert all(key.thread_id == thread_id for key in [*rows.messages, *rows.usage])
        whole.threads.update(rows.threads)
        whole.messages.update(rows.messages)
        whole.usage.update(rows.usage)
    assert thread_ids == sorted(set(thread_ids))
    assert whole == expected_rows(rebuild(ledger_events(events)))


@settings(max_examples=100, deadline=None)
@given(delivered())
def test_every_event_gets_one_outcome_and_repeats_are_duplicates(events: list[AnyEvent]) -> None:
    plan = reduce_batch(ledger_events(events), StoredState())
    assert len(plan.outcomes) == len(events)
    seen = set()
    for event, outcome in zip(events, plan.outcomes, strict=True):
        # Only an exact copy is a duplicate; a differing copy of an event_id competes.
        # (A copy of a rejected event is judged again, and rejected again.)
        copy = ledger_event(event).copy_key
        if copy in seen:
            assert outcome is Outcome.DUPLICATE
        if outcome is not Outcome.REJECTED:
            seen.add(copy)


@settings(max_examples=100, deadline=None)
@given(delivered(), st.randoms(use_true_random=False))
def test_a_repeated_object_is_judged_like_an_equal_copy(
    events: list[AnyEvent], rng: random.Random
) -> None:
    """The batch decoder hands out one object for a value delivered twice; reduce_batch must
    decide exactly as for two equal objects."""
    decoded = {id(event): ledger_event(event) for event in events}
    repeats = [rng.choice(events) for _ in range(len(events) // 2 + 1)]
    batch = list(events) + repeats
    rng.shuffle(batch)
    shared = [decoded[id(event)] for event in batch]
    assert reduce_batch(shared, StoredState()) == reduce_batch(ledger_events(batch), StoredState())


@settings(max_examples=100, deadline=None)
@given(delivered())
def test_a_copy_of_a_stored_claim_builds_no_row(events: list[AnyEvent]) -> None:
    """Redelivered after the batch committed: dropped before any candidate row is built (the
    rows are what the fold builds; none is built), every outcome a duplicate."""
    batch = ledger_events(events)
    first = reduce_batch(batch, StoredState())
    stored = StoredState(
        threads={row.id: row for row in first.threads},
        messages={
            row.key: StoredMessage(
                claim=row.claim,
                created_at=row.created_at,
                usage_claim=usage.claim if (usage := usage_of.get(row.key)) else None,
                usage_created_at=usage.created_at if usage else None,
            )
            for usage_of in [{u.key: u for u in first.usage}]
            for row in first.messages
        },
    )
    applied = [e for e, o in zip(batch, first.outcomes, strict=True) if o is Outcome.APPLIED]
    with patch("consumer.ledger.merge.candidates", side_effect=AssertionError("a row built")):
        again = reduce_batch(applied, stored)
    assert set(again.outcomes) <= {Outcome.DUPLICATE}
    assert (again.threads, again.messages, again.usage) == ([], [], [])


@settings(max_examples=200, deadline=None)
@given(delivered(consistent_spaces=False), st.integers(min_value=0, max_value=40))
def test_rows_built_while_decoding_fold_to_the_same_plan(events: list[AnyEvent], cut: int) -> None:
    """The consumer builds each event's candidate rows while decoding (beside the batch in
    flight) and hands them to reduce_batch: the plan is the one it builds itself."""
    earlier, batch = ledger_events(events[:cut]), ledger_events(events[cut:])
    first = reduce_batch(earlier, StoredState())
    stored = StoredState(
        threads={row.id: row for row in first.threads},
        messages={
            row.key: StoredMessage(claim=row.claim, created_at=row.created_at)
            for row in first.messages
        },
    )
    built = [event_rows(event) for event in batch]
    assert reduce_batch(batch, stored, built) == reduce_batch(batch, stored)
