"""Dead letters are sent inside the batch transaction: a connection lost before COMMIT sends
them again on the retry (at-least-once), an offset replay of the committed range sends none,
a fenced zombie sends none, and one batch holding a position twice still commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.errors import FencedError
from consumer.kafka.dead_letters import DeadLetter
from consumer.ledger.batch import Decoded, commit_batch, decode_records
from consumer.ledger.database import asyncpg_dsn, create_pool
from consumer.ledger.offsets import OffsetMove
from consumer.retry import as_transient

TOPIC = "chat.turn-events"


def _poison(offset: int, partition: int = 0) -> ConsumerRecord:
    value = b"{not json"
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, b"1", value, None, 1, len(value), [])


def _decoded(records: list[ConsumerRecord]) -> Decoded:
    return decode_records(records, max_bytes=1 << 20, max_future_skew=timedelta(hours=1))


async def test_letters_sent_then_commit_lost_are_sent_again(ledger_url: str) -> None:
    pool = await create_pool(ledger_url)
    killer = await asyncpg.connect(asyncpg_dsn(ledger_url))
    sent: list[list[int]] = []
    kill = True

    async def report(letters: Sequence[DeadLetter]) -> None:
        if letters:
            sent.append([x.record.offset for x in letters])
        if kill:  # acked by the broker; now the connection dies before COMMIT
            await killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'token-ledger' AND state = 'idle in transaction'"
            )

    records = [_poison(0), _poison(1)]
    moves = [OffsetMove(0, None, 2)]
    try:
        lost_connection = (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
        )
        with pytest.raises(lost_connection) as lost:
            await commit_batch(pool, "g", TOPIC, moves, _decoded(records), report)
        assert as_transient(lost.value) is not None, repr(lost.value)
        kill = False
        applied = await commit_batch(pool, "g", TOPIC, moves, _decoded(records), report)
        assert sent == [[0, 1], [0, 1]]
        assert [x.record.offset for x in applied.sent] == [0, 1]
        # The same range again (an offset replay from 0): nothing is sent.
        await killer.execute("UPDATE consumer_offsets SET next_offset = 0")
        again = await commit_batch(
            pool, "g", TOPIC, [OffsetMove(0, 0, 2)], _decoded(records), report
        )
        assert again.sent == [] and sent == [[0, 1], [0, 1]]
        # A zombie expecting 0 while the stored offset is 2: fenced, sends nothing.
        with pytest.raises(FencedError):
            await commit_batch(pool, "g", TOPIC, [OffsetMove(0, 0, 2)], _decoded(records), report)
        assert sent == [[0, 1], [0, 1]]
    finally:
        await killer.close()
        await pool.close()


async def test_one_batch_holding_a_position_twice_is_not_a_stuck_batch(ledger_url: str) -> None:
    """ON CONFLICT DO UPDATE cannot affect a row twice in one statement (SQLSTATE 21000): the
    position is recorded once, its first letter sent."""
    pool = await create_pool(ledger_url)
    got: list[int] = []

    async def report(letters: Sequence[DeadLetter]) -> None:
        got.extend(x.record.offset for x in letters)

    records = [_poison(0), _poison(0)]
    try:
        await commit_batch(pool, "g", TOPIC, [OffsetMove(0, None, 1)], _decoded(records), report)
    finally:
        await pool.close()
    assert got == [0]
