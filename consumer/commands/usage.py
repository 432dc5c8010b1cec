"""`token-ledger usage`: the billing report (consumer/commands/queries.py `usage_report`) and
its total, read in one snapshot."""

from __future__ import annotations

from typing import Any

from consumer.commands.queries import UsageFilter, usage_report
from consumer.ledger.schema import connect_checked
from consumer.settings import Settings


async def usage_with_total(
    settings: Settings, group_by: list[str], only: UsageFilter, *, total: bool
) -> list[dict[str, Any]]:
    """The report's rows, then (with `total`) one row of the totals: its dimensions are
    "total" (the first) and "" in a table, null in JSON, where `total` is true."""
    conn = await connect_checked(settings)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await usage_report(conn, group_by, only)
            if total:
                (sums,) = await usage_report(conn, [], only)
    finally:
        await conn.close()
    if total:
        rows.append({**dict.fromkeys(group_by), **sums, "total": True})
    return rows
