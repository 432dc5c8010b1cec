"""Lag as a read_committed consumer sees it, and readiness while a transaction is open."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from consumer.http.metrics import LedgerMetrics
from consumer.kafka.lag import PartitionEnds, counted_from, held_partitions
from consumer.status import Held, Readiness


def test_lag_ends_at_the_last_stable_offset_and_the_rest_is_uncommitted() -> None:
    # A transaction open from offset 40; records up to the high watermark wait behind it.
    end = PartitionEnds(position=31, stable=40, highwater=55)
    assert (end.lag, end.uncommitted) == (9, 15)
    assert PartitionEnds(position=40, stable=40, highwater=55).lag == 0
    # Past a trailing commit marker the position is the high watermark: nothing left.
    done = PartitionEnds(position=56, stable=56, highwater=56)
    assert (done.lag, done.uncommitted) == (0, 0)


def test_records_fetched_and_not_committed_count_from_the_stored_offset() -> None:
    # Stored 100; records up to 149 fetched (a batch blocked on the database): the position is
    # past them, but all 50 still wait.
    start = counted_from(position=150, stored=100, fetched=(100, 150))
    assert PartitionEnds(position=150, stable=160, highwater=160, counted_from=start).lag == 60
    # Everything fetched committed, the last offset a commit marker the stored offset points
    # at: the position has stepped over it, and nothing waits.
    caught_up = counted_from(position=161, stored=160, fetched=(100, 160))
    assert PartitionEnds(position=161, stable=161, highwater=161, counted_from=caught_up).lag == 0
    # Nothing stored yet (a new group): from the first record fetched.
    assert counted_from(position=60, stored=None, fetched=(0, 60)) == 0
    # Nothing fetched since the last seek: the position.
    assert counted_from(position=7, stored=5) == 7


def test_a_partition_is_held_since_its_last_stable_offset_stopped_moving() -> None:
    first = held_partitions(
        {},
        {
            0: PartitionEnds(position=10, stable=10, highwater=14),
            1: PartitionEnds(position=3, stable=7, highwater=7),  # no open transaction
        },
        now=100.0,
    )
    assert first == {0: Held(stable=10, records=4, since=100.0)}
    # Standing still, more records behind it: still held since the first sight.
    again = held_partitions(first, {0: PartitionEnds(10, 10, 20)}, now=160.0)
    assert again == {0: Held(stable=10, records=10, since=100.0)}
    # The transaction ended and another opened: the LSO moved, the clock starts over.
    moved = held_partitions(again, {0: PartitionEnds(12, 15, 20)}, now=170.0)
    assert moved == {0: Held(stable=15, records=5, since=170.0)}
    assert held_partitions(moved, {0: PartitionEnds(20, 20, 20)}, now=171.0) == {}
    assert held_partitions(moved, {}, now=171.0) == {}  # revoked


def test_an_open_transaction_makes_the_consumer_not_ready_only_past_the_bound() -> None:
    readiness = Readiness(stall_seconds=5, assigned=frozenset({0, 1, 2}))
    now = time.monotonic()
    readiness.held = {2: Held(stable=10, records=4, since=now - 1)}
    assert readiness.reasons_not_ready() == []
    readiness.held = {
        0: Held(stable=3, records=2, since=now - 6),
        2: Held(stable=10, records=4, since=now - 7),
        1: Held(stable=8, records=1, since=now - 1),  # within the bound: not named
    }
    [reason] = readiness.reasons_not_ready()
    assert reason.startswith("open transaction: 6 records wait on partition 0, 2 behind")
    assert "stalled" not in reason


def test_uncommitted_series_follow_the_assigned_partitions() -> None:
    metrics = LedgerMetrics()
    metrics.set_uncommitted({0: 0, 1: 12})
    assert (
        metrics.registry.get_sample_value("token_ledger_uncommitted_records", {"partition": "1"})
        == 12
    )
    metrics.set_uncommitted({0: 3})
    exposition = generate_latest(metrics.registry).decode()
    assert 'token_ledger_uncommitted_records{partition="0"} 3.0' in exposition
    assert 'partition="1"' not in exposition
