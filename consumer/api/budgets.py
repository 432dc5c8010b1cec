"""The usage API's budget routes: `GET /v1/budgets` and `GET /v1/budgets/{id}`, each budget's
limits and its current UTC period's spend and crossed thresholds, answered by the statement of
`token-ledger budget list` (consumer/commands/budgets.py `list_budgets`), so both give the same
answers (docs/operations.md#the-usage-api).

Scoping, as for /v1/usage: an admin key reads every budget (or one space's, with `space_id`).
A space key reads its space's budgets; a key of one user, its own user's budgets only (a
space-wide budget's spend is every user's: with the user's own usage it would tell the other
users' apart). A `space_id` or a budget id outside the key's scope is NotFound, the same answer
as an id that does not exist, so the answer never tells the two apart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field

from consumer.api.keys import KeyScope
from consumer.api.queries import BadParameterError, NotFoundError, bound_transaction
from consumer.api.routes import DATABASE_SECONDS, ERRORS, key_scope
from consumer.commands.budgets import list_budgets
from producer.events import MAX_INT64

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # each budget sums its period's usage: fewer per page than usage groups

router = APIRouter()


class BudgetLimits(BaseModel):
    cost_micros: int | None = Field(description="money in millionths; null: no cost limit")
    total_tokens: int | None = Field(description="null: no token limit")


class BudgetSpend(BaseModel):
    cost_micros: int
    total_tokens: int


class Crossing(BaseModel):
    measure: Literal["cost_micros", "total_tokens"]
    threshold: int = Field(description="percent of the measure's limit")


class BudgetOut(BaseModel):
    id: int
    space_id: int
    user_id: uuid.UUID | None = Field(description="null: a budget of the whole space")
    period: Literal["day", "month", "total"] = Field(description="UTC calendar day or month")
    limits: BudgetLimits
    thresholds: list[int] = Field(description="percents of a limit that alert")
    period_start: str = Field(
        description="the current period's start, RFC 3339 UTC (total: 0001-01-01T00:00:00Z)"
    )
    spend: BudgetSpend = Field(description="the current period's spend, from the ledger's rows")
    crossed: list[Crossing] = Field(
        description="thresholds crossed in the current period, as the alerts said; a period"
        " not judged yet (no usage in it since the budget was set) has none"
    )


class BudgetPage(BaseModel):
    rows: list[BudgetOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


def as_api(row: dict[str, Any]) -> dict[str, Any]:
    """A row of `budget list --format json` as the API names and nests it."""
    crossed = [entry.rpartition(":") for entry in row["crossed"]]
    return {
        "id": row["id"],
        "space_id": row["search_space_id"],
        "user_id": row["user_id"],
        "period": row["period"],
        "limits": {
            "cost_micros": row["cost_micros_limit"],
            "total_tokens": row["total_tokens_limit"],
        },
        "thresholds": row["thresholds"],
        "period_start": row["period_start"],
        "spend": {"cost_micros": int(row["cost_micros"]), "total_tokens": int(row["total_tokens"])},
        "crossed": [{"measure": m, "threshold": int(t)} for m, _, t in crossed],
    }


def encode_cursor(last_id: int) -> str:
    text = json.dumps({"budget": last_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The last id of the page a cursor came from."""
    try:
        found = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = found["budget"]
        # bool is an int to Python, never an id.
        ok = type(after) is int and 1 <= after <= MAX_INT64
    except (ValueError, TypeError, KeyError, RecursionError, binascii.Error):
        ok = False
    if not ok:
        raise BadParameterError(
            "cursor", "not a cursor of this query: pass next_cursor as it came", cursor
        )
    return int(after)


def _scope(scope: KeyScope, space_id: int | None) -> tuple[int | None, uuid.UUID | None]:
    """(the space to read, the user whose budgets alone it may see)."""
    if scope.admin:
        return space_id, None
    if space_id is not None and space_id != scope.space_id:
        raise NotFoundError
    return scope.space_id, scope.user_id


async def _budgets(request: Request, scope: KeyScope, **filters: Any) -> list[dict[str, Any]]:
    space, user = _scope(scope, filters.pop("space_id", None))
    pool: asyncpg.Pool = request.app.state.pool
    timeout_ms: int = request.app.state.timeout_ms
    # As for /v1/usage: the server's statement timeout, and the client's for a frozen database.
    async with (
        asyncio.timeout(timeout_ms / 1000 + DATABASE_SECONDS),
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        await bound_transaction(conn, timeout_ms)
        return await list_budgets(conn, space, visible_to=user, **filters)


def _json(body: object) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.get(
    "/v1/budgets",
    response_model=BudgetPage,
    responses=ERRORS,
    summary="Budgets with their current period's spend and crossed thresholds",
    operation_id="list_budgets",
)
async def get_budgets(
    request: Request,
    scope: Annotated[KeyScope, Depends(key_scope)],
    space_id: Annotated[
        int | None, Query(ge=1, le=MAX_INT64, description="only this search space's budgets")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="budgets per page at most")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(max_length=256, pattern="^[A-Za-z0-9_-]+$", description="next_cursor of a page"),
    ] = None,
) -> Response:
    """The budgets the key sees, by id: limits, thresholds, and for the current UTC period its
    start, spend and the thresholds crossed, as `token-ledger budget list --format json`."""
    after = decode_cursor(cursor) if cursor is not None else None
    found = await _budgets(request, scope, space_id=space_id, after=after, limit=limit + 1)
    page = found[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(found) > limit else None
    return _json({"rows": [as_api(row) for row in page], "next_cursor": next_cursor})


@router.get(
    "/v1/budgets/{id}",
    response_model=BudgetOut,
    responses=ERRORS,
    summary="One budget with its current period's spend and crossed thresholds",
    operation_id="get_budget",
)
async def get_budget(
    request: Request,
    scope: Annotated[KeyScope, Depends(key_scope)],
    budget_id: Annotated[int, Path(alias="id", ge=1, le=MAX_INT64, description="its id")],
) -> Response:
    """One budget the key sees, as in the list; another tenant's, or none: 404."""
    found = await _budgets(request, scope, budget_id=budget_id, limit=1)
    if not found:
        raise NotFoundError
    return _json(as_api(found[0]))
