"""The ledger database's connections: the pool, a readiness ping, and the libpq form of the
configured URL."""

from __future__ import annotations

import asyncio

import asyncpg


def asyncpg_dsn(database_url: str) -> str:
    """libpq form of a SQLAlchemy URL (drops the '+asyncpg' driver suffix)."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_pool(database_url: str, *, max_size: int = 4) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(database_url),
        min_size=0,  # start even while the database is away: batches retry until it is back
        max_size=max_size,
        timeout=5,  # connecting: a database that is down must not hold a batch for long
        command_timeout=60,
        server_settings={"application_name": "token-ledger"},
    )
    return pool


async def ping(pool: asyncpg.Pool, seconds: float = 2.0) -> bool:
    """Whether the database answers right now (for /readyz)."""
    try:
        async with asyncio.timeout(seconds):
            return bool(await pool.fetchval("SELECT 1"))
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        # A pooled connection that has read its server's FATAL (a restart terminating idle
        # backends) but not yet its close: the pool terminates it on release.
        asyncpg.InternalClientError,
    ):
        return False
