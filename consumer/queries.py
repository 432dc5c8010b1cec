"""Read-side SQL for operators: the whole ledger as values (verify), the billing report
(usage), and rewinding stored offsets (replay). The hot path's SQL is in store.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Set
from typing import Any

import asyncpg

from consumer.ledger import LedgerRows, message_values, thread_values, usage_values
from consumer.merge import Claim, MessageKey, MessageRow, ThreadRow, UsageRow
from consumer.store import stored_key


async def read_ledger(conn: asyncpg.Connection) -> LedgerRows:
    """Every ledger row as comparable values (see merge.LedgerRows)."""
    threads = await conn.fetch("SELECT * FROM chat_threads")
    messages = await conn.fetch("SELECT * FROM chat_messages")
    usage = await conn.fetch(
        "SELECT u.*, m.role, m.turn_id, m.content_event_id AS message_event_id"
        " FROM token_usage u JOIN chat_messages m ON m.id = u.message_id"
    )
    return LedgerRows(
        threads={r["id"]: thread_values(ThreadRow(**_pick(r, ThreadRow))) for r in threads},
        messages={
            stored_key(r): message_values(
                MessageRow(
                    key=stored_key(r),
                    claim=Claim(r["content_rank"], r["content_at"], r["content_event_id"]),
                    content=json.loads(r["content"]),
                    author_id=r["author_id"],
                    created_at=r["created_at"],
                )
            )
            for r in messages
        },
        usage={
            key: usage_values(
                UsageRow(
                    key=key,
                    claim=Claim(r["source_rank"], r["source_at"], r["source_event_id"]),
                    model_breakdown=json.loads(r["model_breakdown"]),
                    call_details=json.loads(r["call_details"]),
                    **_pick(r, UsageRow, skip={"key", "claim", "model_breakdown", "call_details"}),
                )
            )
            for r in usage
            for key in [
                MessageKey(
                    r["thread_id"],
                    r["role"],
                    r["turn_id"],
                    None if r["turn_id"] is not None else r["message_event_id"],
                )
            ]
        },
    )


def _pick(row: Mapping[str, Any], cls: type, skip: Set[str] = frozenset()) -> dict[str, Any]:
    return {f.name: row[f.name] for f in dataclasses.fields(cls) if f.name not in skip}
