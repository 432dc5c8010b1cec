"""The usage API's routes: what each parameter means is in its OpenAPI description
(docs/api/openapi.json), the rules behind them in docs/operations.md#the-usage-api."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from consumer.api import metrics
from consumer.api.keys import KeyScope, authenticate
from consumer.api.queries import (
    BadParameterError,
    UsageQuery,
    decode_cursor,
    parse_group_by,
    usage_page,
)
from producer import jsonvalues
from producer.events import MAX_INT64

_GROUP = "(space|user|model|day|month)"
_GROUPS = f"^ *{_GROUP} *(, *{_GROUP} *)*$"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")

# Beyond a statement's own timeout: a connection, a key look-up (client side).
DATABASE_SECONDS = 5.0

router = APIRouter()
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="api_key",
    description="A key from `token-ledger api-key create`, as `Authorization: Bearer <key>`",
)


class Problem(BaseModel):
    detail: str


class UsageRow(BaseModel):
    """One group: its group columns (those of `group_by`), then its sums."""

    space_id: int | None = Field(None, description="with group_by=space")
    user_id: uuid.UUID | None = Field(
        None, description="with group_by=user; null: usage without a user"
    )
    model: str | None = Field(
        None,
        description="with group_by=model (or a model filter); '(unattributed)': the part"
        " of a usage's totals its per-model breakdown does not cover",
    )
    day: str | None = Field(None, description="with group_by=day: YYYY-MM-DD, UTC")
    month: str | None = Field(None, description="with group_by=month: YYYY-MM, UTC")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int = Field(description="money in millionths of the currency unit")
    cached_tokens: float = Field(description="where breakdowns report them, else 0")
    reasoning_tokens: float = Field(description="where breakdowns report them, else 0")
    usage_rows: int = Field(description="usage records (LLM turns or messages) counted")


class UsagePage(BaseModel):
    rows: list[UsageRow]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


def _rfc3339(value: object) -> object:
    # Before pydantic parses it: it would take a time without a zone, or a Unix timestamp.
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 time with its zone, e.g. 2026-12-01T00:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("outside the years 1 to 9999 in UTC") from None


Time = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_utc)]


async def key_scope(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> KeyScope:
    """The caller's key, checked before any parameter is looked at: 401 otherwise."""
    scope = None
    if credentials is not None:
        pool: asyncpg.Pool = request.app.state.pool
        async with asyncio.timeout(DATABASE_SECONDS):  # a database that froze: 503, not a hang
            scope = await authenticate(pool, credentials.credentials)
    if scope is None:
        raise HTTPException(
            401, "missing, unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return scope


ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "no key, or an unknown or revoked one"},
    404: {"model": Problem, "description": "a space or user outside the key's scope"},
    503: {"model": Problem, "description": "past the statement timeout, or no database"},
}


@router.get(
    "/v1/usage",
    response_model=UsagePage,
    responses=ERRORS,
    summary="Token usage and cost, grouped and filtered",
    operation_id="get_usage",
)
async def get_usage(
    request: Request,
    scope: Annotated[KeyScope, Depends(key_scope)],
    since: Annotated[
        Time | None,
        Query(alias="from", description="from this time, inclusive (RFC 3339, with a zone)"),
    ] = None,
    until: Annotated[
        Time | None,
        Query(alias="to", description="up to this time, exclusive (RFC 3339, with a zone)"),
    ] = None,
    group_by: Annotated[
        list[Annotated[str, Field(max_length=64, pattern=_GROUPS)]] | None,
        Query(
            max_length=5,
            description="groups, from space, user, model, day, month (UTC): comma-separated,"
            " repeated, or both; each at most once. None: one row of totals",
        ),
    ] = None,
    space_id: Annotated[
        int | None, Query(ge=1, le=MAX_INT64, description="only this search space")
    ] = None,
    user_id: Annotated[uuid.UUID | None, Query(description="only this user")] = None,
    model: Annotated[
        str | None,
        Query(min_length=1, max_length=1000, pattern="^[^\\x00]*$", description="only this model"),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="groups per page at most")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(max_length=8192, pattern="^[A-Za-z0-9_-]+$", description="next_cursor of a page"),
    ] = None,
) -> Response:
    """Sums of tokens and cost (integer micros) of the usage whose time (its winning event's
    occurred_at) is in [from, to), by the chosen groups, ordered by their values as text. By
    model, a usage's totals are split over the models of its breakdown, and what the breakdown
    does not cover is `(unattributed)`: the groups always sum to the totals, as in
    `token-ledger usage --by model`."""
    groups = parse_group_by(group_by)
    if since is not None and until is not None and since >= until:
        raise BadParameterError("to", "must be after `from`", until.isoformat())
    query = UsageQuery(
        group_by=groups,
        since=since,
        until=until,
        space_id=space_id,
        user_id=user_id,
        model=model,
        limit=limit,
        after=decode_cursor(cursor, groups) if cursor is not None else None,
    )
    pool: asyncpg.Pool = request.app.state.pool
    # The statement timeout is the server's: a database that froze (or a partition) never
    # answers it, so the client side bounds the whole exchange too (TimeoutError: 503).
    async with asyncio.timeout(request.app.state.timeout_ms / 1000 + DATABASE_SECONDS):
        async with pool.acquire() as conn:
            rows, next_cursor = await usage_page(
                conn, scope, query, timeout_ms=request.app.state.timeout_ms
            )
    # jsonvalues: sums are exact (a token kind a legacy breakdown sent as a fraction too).
    body = jsonvalues.dumps({"rows": rows, "next_cursor": next_cursor})
    return Response(body, media_type="application/json")


@router.get("/healthz", response_class=PlainTextResponse, summary="Alive", operation_id="healthz")
async def healthz() -> str:
    """200 `ok` while the process runs (no database is asked)."""
    return "ok"


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics of this API",
    operation_id="metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics_text() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
