"""The index migration 0007 adds for the usage API: one space's month by day by model is read
through `ix_token_usage_search_space_id_source_at`, not by scanning every space's usage
(docs/operations.md#the-usage-api). `make bench` times the same request over 1,000,000 usage rows
(bench/api.py, docs/development.md#the-usage-api)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg

from consumer.commands.queries import UsageFilter, usage_report
from tests.factories import START

SPACES, ROWS = 500, 50_000
DECEMBER = datetime(2026, 12, 1, tzinfo=UTC)


async def test_a_month_of_one_space_by_day_by_model_uses_the_space_index(
    ledger: asyncpg.Connection,
) -> None:
    await ledger.execute(
        "INSERT INTO chat_threads (id, search_space_id, created_at, updated_at)"
        " SELECT s, s, now(), now() FROM generate_series(1, $1) AS s",
        SPACES,
    )
    await ledger.execute(
        "INSERT INTO token_usage (prompt_tokens, completion_tokens, total_tokens, cost_micros,"
        " model_breakdown, call_details, thread_id, search_space_id, source, source_rank,"
        " source_at, source_event_id, created_at, updated_at)"
        " SELECT 1, 1, 2, 10, jsonb_build_object('m' || (i % 7), jsonb_build_object("
        "   'prompt_tokens', 1, 'completion_tokens', 1, 'total_tokens', 2, 'cost_micros', 10)),"
        " '[]', 1 + i % $2, 1 + i % $2, 'turn.finalized', 2,"
        " $3::timestamptz + (i % 90) * interval '1 day', gen_random_uuid(), now(), now()"
        " FROM generate_series(1, $1) AS i",
        ROWS,
        SPACES,
        START,
    )
    await ledger.execute("ANALYZE token_usage")
    seen: list[tuple[str, Any]] = []
    ledger.add_query_logger(lambda record: seen.append((record.query, record.args)))
    async with ledger.transaction(readonly=True):
        await ledger.execute("SET LOCAL plan_cache_mode = force_custom_plan")  # as the API does
        month = UsageFilter(DECEMBER, DECEMBER.replace(year=2027, month=1), space=7)
        rows = await usage_report(ledger, ["month", "day", "model"], month)
        assert rows and {row["month"] for row in rows} == {"2026-12"}
        await asyncio.sleep(0)  # query loggers are called soon after, not during, the query
        query, args = next(entry for entry in reversed(seen) if "jsonb_each" in entry[0])
        (plan,) = json.loads(await ledger.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args))
    assert "ix_token_usage_search_space_id_source_at" in json.dumps(plan), plan
