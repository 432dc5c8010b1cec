"""token-ledger's native paths (native/src/lib.rs): used through consumer/ledger/native.py and
consumer/ledger/arrays.py."""

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

# The fields the native rules read, by model: "envelope", "turn.started", "turn.finalized",
# "message.appended", "usage", "call", "legacy", "entry".
KNOWN_FIELDS: dict[str, tuple[str, ...]]

class Decoder:
    def __init__(
        self,
        *,
        started: list[str],
        finalized: list[str],
        appended: list[str],
        usage: list[str],
        call: list[str],
        legacy: list[str],
        entry: list[str],
        measures: list[str],
        kinds: list[str],
        max: int,
        calls: int,
    ) -> None: ...
    def decode(
        self, value: bytes, max_bytes: int, max_nesting: int
    ) -> (
        tuple[
            str,  # type
            uuid.UUID,  # event_id
            datetime,  # occurred_at, in UTC
            int,  # thread_id
            int,  # search_space_id
            uuid.UUID | None,  # user_id
            str | None,  # turn_id
            str | None,  # role
            bytes,  # digest
            str,  # the JSON text of the content its message stores
            # None, or its usage row's totals (USAGE_MEASURES), breakdown and call details (JSON)
            tuple[int, int, int, int, dict[str, dict[str, Any]], str] | None,
            int,  # unknown fields
        ]
        | None
    ): ...

def ascii_text(value: bytes, max_nesting: int) -> bytes | None: ...

class Columns:
    """Rows to statement arguments, one per (attribute path, PostgreSQL type) column: an array
    literal (bigint, smallint, text, timestamptz) or a list of values (uuid, bytea, jsonb, and
    json: a str that is JSON text already)."""

    def __init__(self, columns: list[tuple[str, str]], json_text: Callable[[Any], str]) -> None: ...
    def __call__(self, rows: list[Any]) -> list[str | list[Any]]: ...
