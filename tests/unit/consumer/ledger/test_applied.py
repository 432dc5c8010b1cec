"""The fingerprints of applied records (consumer/ledger/applied.py), as pure functions: rows
split at block boundaries, and only an equal fingerprint at the same position recognised."""

from __future__ import annotations

from datetime import timedelta

from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from consumer.ledger.applied import BLOCK, ENTRY, event_type, fingerprint, recognised, rows_of
from consumer.ledger.batch import Decoding

STARTED = bytes([1]) + fingerprint(b"{not json either", 0)


def _record(partition: int, offset: int, value: bytes, timestamp: int = 0) -> ConsumerRecord:
    return ConsumerRecord("t", partition, offset, timestamp, 0, b"", value, None, 0, 0, [])


@given(st.sets(st.tuples(st.integers(0, 2), st.integers(0, 3 * BLOCK)), min_size=1))
def test_rows_hold_each_entry_at_its_position_within_one_block(
    positions: set[tuple[int, int]],
) -> None:
    entries = {p: bytes([1]) + fingerprint(str(p).encode(), 0) for p in positions}
    rows = rows_of(entries)
    held = {}
    stored_rows = []
    for partition, block, start, stored in rows:
        assert block % BLOCK == 0 and start % ENTRY == 0
        first = block + start // ENTRY
        count = len(stored) // ENTRY
        assert block <= first and first + count <= block + BLOCK  # within its block
        for index in range(count):
            entry = stored[index * ENTRY : (index + 1) * ENTRY]
            if entry[0]:
                held[partition, first + index] = entry
        stored_rows.append((partition, block, bytes(start) + stored))  # as the row holds it
    assert held == entries
    records = {p: _record(*p, str(p).encode()) for p in positions}
    found = recognised(stored_rows, records)
    assert {p: event_type(e) for p, e in found.items()} == dict.fromkeys(positions, "turn.started")


def test_another_value_timestamp_or_position_is_not_recognised() -> None:
    rows = [(0, 0, bytes(5 * ENTRY) + bytes([2]) + fingerprint(b"x", 7))]
    found = recognised(rows, {(0, 5): _record(0, 5, b"x", 7)})
    assert {p: event_type(e) for p, e in found.items()} == {(0, 5): "turn.finalized"}
    for other in (_record(0, 5, b"y", 7), _record(0, 5, b"x", 8), _record(0, 6, b"x", 7)):
        assert recognised(rows, {(other.partition, other.offset): other}) == {}
    assert fingerprint(b"x", None) != fingerprint(b"x", 0)


def test_an_unknown_type_code_is_not_recognised() -> None:
    # A later release's event type, met after a rollback: decoded, never an error.
    rows = [(0, 0, bytes([4]) + fingerprint(b"x", 7))]
    assert recognised(rows, {(0, 0): _record(0, 0, b"x", 7)}) == {}


def test_a_recognised_record_is_counted_not_decoded() -> None:
    decoding = Decoding(max_bytes=1 << 20, max_future_skew=timedelta(hours=1))
    records = [_record(0, 0, b"{not json"), _record(0, 1, b"{not json either")]
    decoding.add(records, known={(0, 1): STARTED})
    assert [letter.record.offset for letter in decoding.decoded.letters] == [0]
    assert [(r.offset, e) for r, e in decoding.decoded.redelivered] == [(1, STARTED)]


def test_recognised_entries_fill_the_gaps_between_new_ones_and_only_there() -> None:
    new = {(0, 2): bytes([1]) + fingerprint(b"2", 0), (0, 8): bytes([1]) + fingerprint(b"8", 0)}
    kept = {(0, o): bytes([2]) + fingerprint(str(o).encode(), 0) for o in (0, 1, 3, 5, 9)}
    ((partition, block, start, stored),) = rows_of(new, kept)
    assert (partition, block, start) == (0, 0, 2 * ENTRY)
    by_offset = {2 + i: stored[i * ENTRY : (i + 1) * ENTRY] for i in range(len(stored) // ENTRY)}
    assert by_offset == {
        2: new[0, 2],
        3: kept[0, 3],
        4: bytes(ENTRY),
        5: kept[0, 5],
        6: bytes(ENTRY),
        7: bytes(ENTRY),
        8: new[0, 8],
    }
    assert rows_of({}, kept) == []  # nothing new: nothing written, not even what was kept
