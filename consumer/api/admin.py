"""`token-ledger api-key create|list|revoke`: keys managed with the ledger's own role
(LEDGER_DATABASE_URL; the API's role may only read them)."""

from __future__ import annotations

import uuid

from consumer.api.keys import StoredKey, create_key, list_keys, revoke_key
from consumer.ledger.schema import connect_checked
from consumer.settings import Settings


async def create(
    settings: Settings, *, admin: bool, space_id: int | None, user_id: uuid.UUID | None
) -> tuple[int, str]:
    conn = await connect_checked(settings)
    try:
        return await create_key(conn, admin=admin, space_id=space_id, user_id=user_id)
    finally:
        await conn.close()


async def listing(settings: Settings) -> list[StoredKey]:
    conn = await connect_checked(settings)
    try:
        return await list_keys(conn)
    finally:
        await conn.close()


async def revoke(settings: Settings, key_id: int) -> bool | None:
    conn = await connect_checked(settings)
    try:
        return await revoke_key(conn, key_id)
    finally:
        await conn.close()
