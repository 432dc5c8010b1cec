"""The "never stops" property (SPEC section 4): whatever a batch holds — valid events, their
mutations (fields removed, types swapped, edge timestamps, reused ids, huge values) or raw
bytes — decode -> reduce -> store against the real database raises nothing out of the batch,
every record is applied or dead-lettered (never both, never neither), the database refuses
nothing the decoder accepted, and the ledger equals the pure rebuild of the accepted events."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.batch import Applied, apply_isolating, decode_records
from consumer.ledger import expected_rows, rebuild
from consumer.merge import Outcome
from consumer.queries import read_ledger
from consumer.store import asyncpg_dsn
from producer.events import DEFAULT_MAX_FUTURE_SKEW, AnyEvent, RejectReason
from tests.examples import EXAMPLE_NAMES, example
from tests.strategies import batch_splits

TABLES = "billing_outbox, token_usage, chat_messages, chat_threads"
PUBLISHED_MS = int(datetime(2026, 11, 26, 10, tzinfo=UTC).timestamp() * 1000)
REUSED_IDS = [str(uuid.UUID(int=i)) for i in (1, 2)]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
edge_timestamps = st.sampled_from(
    [
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999-12:00",
        "9999-12-31T23:59:59Z",
        "2026-11-26T09:15:00.123456789Z",
        "2026-11-26T09:15:00+00:00",
        "2026-11-26 09:15:00Z",
        "2026-11-26T09:15:00",
        "2027-11-26T09:15:00Z",
        "not a time",
    ]
)
raw_tokens = st.sampled_from(
    [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1e999999", b"12345678901234567890.123", b"-0.0"]
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield (*prefix, index)
            yield from _paths(inner, (*prefix, index))


def _get(body: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        body = body[step]
    return body


def _set(body: Any, path: tuple[Any, ...], value: Any, *, drop: bool = False) -> None:
    for step in path[:-1]:
        body = body[step]
    if drop:
        del body[path[-1]]
    else:
        body[path[-1]] = value


@st.composite
def mutated_values(draw: st.DrawFn) -> bytes:
    body = example(draw(st.sampled_from(EXAMPLE_NAMES)))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(body))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["drop", "swap", "timestamp", "reuse", "huge", "unknown"]))
        if how == "drop":
            _set(body, path, None, drop=True)
        elif how == "swap":
            _set(body, path, draw(json_values))
        elif how == "timestamp":
            body["occurred_at"] = draw(edge_timestamps)
        elif how == "reuse":
            body["event_id"] = draw(st.sampled_from(REUSED_IDS))
            body["thread_id"] = draw(st.sampled_from([4242, 4243]))
        elif how == "huge":
            _set(body, path, draw(st.sampled_from([2**63, 2**63 - 1, -1, "x" * 5000, 10**30])))
        else:  # a field this consumer does not know, in any object
            objects = [body, *(v for p in paths if isinstance(v := _get(body, p), dict))]
            draw(st.sampled_from(objects))["brand_new_field"] = draw(json_values)
        if not isinstance(body, dict):
            break
    text = json.dumps(body).encode()
    if draw(st.booleans()):  # a number written as no JSON encoder would
        text = text.replace(b"4242", draw(raw_tokens), 1)
    return text


record_values = st.one_of(
    mutated_values(), mutated_values(), st.binary(max_size=64), st.just(b""), st.none()
)
record_timestamps = st.sampled_from([PUBLISHED_MS, None, -1, 0, 9_000_000_000_000_000])


class Driver:
    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(asyncpg_dsn(url))
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()

    async def run(self, batches: list[list[ConsumerRecord]]) -> Outcomes:
        await self.conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
        seen = Outcomes()
        for batch in batches:
            decoded = decode_records(
                batch, max_bytes=1024 * 1024, max_future_skew=DEFAULT_MAX_FUTURE_SKEW
            )
            applied = Applied()
            async with self.conn.transaction():
                await apply_isolating(
                    self.conn, list(zip(decoded.events, decoded.records, strict=True)), applied
                )
            seen.accepted += decoded.events
            seen.undecodable += [letter.record.offset for letter in decoded.letters]
            seen.rejected += [(letter.record.offset, letter.reason) for letter in applied.letters]
            # apply_isolating keeps the order of its items, halves included.
            for record, (_, outcome) in zip(decoded.records, applied.events, strict=True):
                seen.outcomes[record.offset] = outcome
        return seen


@dataclass
class Outcomes:
    accepted: list[AnyEvent] = field(default_factory=list)
    undecodable: list[int] = field(default_factory=list)
    rejected: list[tuple[int, RejectReason]] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)


@pytest.fixture
def driver(ledger_url: str) -> Iterator[Driver]:
    driver = Driver(ledger_url)
    yield driver
    driver.close()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_record_stops_a_batch_and_each_is_applied_or_dead_lettered(
    driver: Driver, data: st.DataObject
) -> None:
    values = data.draw(st.lists(record_values, min_size=1, max_size=8))
    records = [
        ConsumerRecord("t", 0, offset, data.draw(record_timestamps), 0, b"1", value, None, 1, 0, [])
        for offset, value in enumerate(values)
    ]
    batches = data.draw(batch_splits(records))
    seen = driver.loop.run_until_complete(driver.run(batches))

    # Every record exactly once: undecodable, or decoded with one outcome; a decoded record is
    # dead-lettered exactly when its outcome says so.
    assert sorted([*seen.undecodable, *seen.outcomes]) == list(range(len(records)))
    rejected = [offset for offset, _ in seen.rejected]
    assert sorted(rejected) == sorted(
        offset for offset, outcome in seen.outcomes.items() if outcome is Outcome.REJECTED
    )
    assert RejectReason.DATABASE_REJECTED not in {reason for _, reason in seen.rejected}
    assert driver.loop.run_until_complete(read_ledger(driver.conn)) == expected_rows(
        rebuild(seen.accepted)
    )
