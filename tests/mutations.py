"""Records as a careless or hostile producer writes them: the examples of docs/contract.md with
fields removed, types swapped, edge timestamps, reused ids, huge values, fields this consumer
does not know, and numbers at and past the edges of docs/contract.md#numbers. Used by the
never-stops property and by the native decoder's agreement property."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

from tests.examples import EXAMPLE_NAMES, example

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
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e400",
        b"1e999999",
        b"12345678901234567890.123",
        b"-0.0",
        # Exponents PostgreSQL writes out; the edges of what every path reads back
        # (docs/contract.md#numbers); past Python's 4,300 digits, as exponent and as integer.
        b"1E5",
        b"-2.50E1",
        b"1e999",
        b"-1e-1000",
        b"1e1000",
        b"1e-1001",
        b"1e4300",
        b"-1e4400",
        b"9" * 1001,
        b"-" + b"9" * 4301,
    ]
)
NUMBER_SENTINEL = 987654321  # a number field added by a mutation, replaced by a raw token


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
        how = draw(
            st.sampled_from(["drop", "swap", "timestamp", "reuse", "huge", "unknown", "number"])
        )
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
        else:  # a field this consumer does not know, in any object: any value, or a number
            objects = [body, *(v for p in paths if isinstance(v := _get(body, p), dict))]
            value = NUMBER_SENTINEL if how == "number" else draw(json_values)
            draw(st.sampled_from(objects))["brand_new_field"] = value
        if not isinstance(body, dict):
            break
    text = json.dumps(body).encode()
    if draw(st.booleans()):  # a number written as no JSON encoder would
        text = text.replace(b"4242", draw(raw_tokens), 1)
    return text.replace(str(NUMBER_SENTINEL).encode(), draw(raw_tokens))
