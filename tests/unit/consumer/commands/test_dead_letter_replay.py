"""`dlq replay` replays each source record once: dead letters grouped by origin, through any
number of replays of records that stay bad (the consumer's headers and replay's, no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from consumer.commands.dead_letters import one_per_origin
from consumer.kafka.dead_letters import (
    DeadLetter,
    SourcePosition,
    dead_letter_headers,
    first_position,
    replay_headers,
)
from producer.events import RejectReason

TOPIC = "chat.turn-events"
AT = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)


class Queue:
    """The source topic and the dead-letter topic (one partition each, so positions grow)."""

    def __init__(self) -> None:
        self.source_end = 0
        self.letters: list[ConsumerRecord] = []

    def read(self, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
        record = ConsumerRecord(TOPIC, 0, self.source_end, 0, 0, b"k", b"bad", None, 1, 3, headers)
        self.source_end += 1
        return record

    def dead_letter(self, record: ConsumerRecord, timestamp: int) -> None:
        letter = DeadLetter(record, RejectReason.INVALID_JSON, "bad")
        self.letters.append(
            ConsumerRecord(
                "dlq",
                0,
                len(self.letters),
                timestamp,
                0,
                b"k",
                b"bad",
                None,
                1,
                3,
                dead_letter_headers(letter, AT, "g"),
            )
        )


@given(
    poison=st.integers(min_value=1, max_value=8),
    resent=st.lists(st.integers(min_value=0, max_value=7), max_size=6),
    replays=st.integers(min_value=1, max_value=4),
)
def test_replays_of_records_that_stay_bad_keep_one_record_per_origin(
    poison: int, resent: list[int], replays: int
) -> None:
    queue = Queue()
    firsts = [queue.read([("trace", b"t")]) for _ in range(poison)]
    for record in firsts:
        queue.dead_letter(record, timestamp=1)
    for index in resent:  # at-least-once: a retried transaction reports a letter again
        queue.dead_letter(firsts[index % poison], timestamp=1)
    origins = {SourcePosition(TOPIC, 0, record.offset) for record in firsts}
    for round_ in range(replays):
        grouped = one_per_origin(queue.letters)
        assert [origin for _, origin in grouped.latest] == sorted(origins, key=lambda p: p.offset)
        assert grouped.copies == len(queue.letters) - poison
        assert grouped.unnamed == []
        for letter, origin in grouped.latest:
            # The latest of its origin: nothing of the same origin was written after it.
            assert all(
                first_position(other) != origin or other.offset <= letter.offset
                for other in queue.letters
            )
            # Published again, read from a new position, still bad: one more dead letter.
            queue.dead_letter(queue.read(replay_headers(letter, origin)), timestamp=2 + round_)
        assert {first_position(letter) for letter in queue.letters} == origins


def test_dead_letters_that_name_no_position_are_set_apart() -> None:
    foreign = ConsumerRecord("dlq", 0, 0, 0, 0, None, b"x", None, 1, 0, [("trace", b"t")])
    grouped = one_per_origin([foreign])
    assert (grouped.latest, grouped.copies, grouped.unnamed) == ([], 0, [foreign])


def test_the_latest_dead_letter_of_an_origin_is_chosen_by_timestamp_then_position() -> None:
    queue = Queue()
    record = queue.read([])
    queue.dead_letter(record, timestamp=5)
    queue.dead_letter(record, timestamp=3)  # a later position with an earlier time
    grouped = one_per_origin(reversed(queue.letters))
    assert [letter.offset for letter, _ in grouped.latest] == [0]
    assert grouped.copies == 1
