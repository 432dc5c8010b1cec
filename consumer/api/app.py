"""The usage API as an ASGI application: routes (routes.py), request metrics (metrics.py), and
the one place where the failures of a request become answers.

    BadParameterError (queries.py)   422, FastAPI's body, naming the parameter
    NotFoundError (queries.py)       404 `not found`: nothing says what was not found
    QueryCanceledError (asyncpg)     503: the request's statement timeout ran out
    no database (connection lost,    503: try again later
      pool exhausted, refused)
    anything else                    500 (a bug: logged with its traceback by Starlette)
"""

from __future__ import annotations

import logging

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from consumer.api import budgets
from consumer.api.metrics import RequestMetrics
from consumer.api.queries import BadParameterError, NotFoundError
from consumer.api.routes import router
from consumer.logs import fields

log = logging.getLogger(__name__)
# Connection (08), credentials (28: a rotated password, a dropped role), resources (53: too
# many connections, disk full), operator intervention (57), no such database (3D).
UNAVAILABLE_CLASSES = frozenset({"08", "28", "53", "57", "3D"})
TITLE = "token-ledger usage API"
VERSION = "1"
DEFAULT_TIMEOUT_MS = 5000


def build_app(pool: asyncpg.Pool | None = None, *, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> FastAPI:
    """The application over `pool` (None: for its OpenAPI document only)."""
    app = FastAPI(
        title=TITLE,
        version=VERSION,
        summary="Token usage and cost of the ledger, per tenant (docs/operations.md)",
        docs_url=None,  # no HTML pages (and their CDN scripts): the document is /openapi.json
        redoc_url=None,
    )
    app.state.pool = pool
    app.state.timeout_ms = timeout_ms
    app.include_router(router)
    app.include_router(budgets.router)
    app.add_middleware(RequestMetrics)

    @app.exception_handler(BadParameterError)
    async def _bad_parameter(request: Request, error: BadParameterError) -> JSONResponse:
        detail = {
            "type": "value_error",
            "loc": ["query", error.name],
            "msg": error.message,
            "input": error.value,
        }
        return JSONResponse({"detail": [detail]}, status_code=422)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": "not found"}, status_code=404)

    @app.exception_handler(asyncpg.QueryCanceledError)
    async def _timed_out(request: Request, error: asyncpg.QueryCanceledError) -> JSONResponse:
        seconds = request.app.state.timeout_ms / 1000
        log.warning(f"a usage query ran past the statement timeout ({seconds:g}s)")
        return JSONResponse(
            {
                "detail": f"the query ran past the statement timeout ({seconds:g}s):"
                " ask for a shorter period, fewer groups or a smaller limit"
            },
            status_code=503,
        )

    async def _no_database(request: Request, error: Exception) -> JSONResponse:
        log.warning(f"the usage API could not use its database: {type(error).__name__}")
        return JSONResponse(
            {"detail": "the ledger's database is not available: try again later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    async def _database_error(request: Request, error: Exception) -> JSONResponse:
        # By SQLSTATE class: the database (or this role's access to it) is away for now, or
        # the query failed for a reason of its own (logged: a bug to report).
        assert isinstance(error, asyncpg.PostgresError)
        if (error.sqlstate or "")[:2] in UNAVAILABLE_CLASSES:
            return await _no_database(request, error)
        log.error("a usage query failed", extra=fields(sqlstate=error.sqlstate), exc_info=error)
        return JSONResponse({"detail": "the query failed: please report it"}, status_code=500)

    app.add_exception_handler(asyncpg.PostgresError, _database_error)
    for unavailable in (
        OSError,  # TimeoutError (no connection free in time) included
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.InsufficientPrivilegeError,  # the role lost its grants: serve said so at start
    ):
        app.add_exception_handler(unavailable, _no_database)
    return app
