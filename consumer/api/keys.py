"""API keys: made once, stored as a digest, looked up by a public id, checked in constant time.

A key is `tl_<lookup id>_<secret>`: the lookup id (16 hex digits, public: `api-key list` shows
it) finds the row, the secret (`secrets.token_urlsafe(32)`, 256 random bits) proves it. Only
HMAC-SHA256(key=lookup id, message=secret) is stored. A slow password hash (PBKDF2, scrypt)
protects secrets people choose, which are guessable; a 256-bit random secret is not, so a slow
hash would only cost CPU on every request (and hand a flood of bad keys that CPU) without making
a leaked digest any easier to keep. Keying the HMAC with the lookup id binds a digest to its
row: a digest copied onto another row does not verify. Digests are compared with
hmac.compare_digest, and an unknown lookup id costs the same comparison as a wrong secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

PREFIX = "tl"
_KEY = re.compile(r"tl_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_NO_ROW_DIGEST = bytes(32)  # compared against when the lookup id is unknown


@dataclass(frozen=True)
class KeyScope:
    """What a key may see: everything (admin), or one search space, or one user of it."""

    key_id: int
    admin: bool
    space_id: int | None
    user_id: uuid.UUID | None


@dataclass(frozen=True)
class StoredKey:
    """A key as `api-key list` shows it: never its secret, nor its digest."""

    id: int
    lookup_id: str
    admin: bool
    space_id: int | None
    user_id: uuid.UUID | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def prefix(self) -> str:
        return f"{PREFIX}_{self.lookup_id}_"

    @property
    def scope(self) -> str:
        if self.admin:
            return "admin"
        return f"space {self.space_id}" + (f" user {self.user_id}" if self.user_id else "")


def digest(lookup_id: str, secret: str) -> bytes:
    return hmac.new(lookup_id.encode(), secret.encode(), hashlib.sha256).digest()


def new_key() -> tuple[str, str, bytes]:
    """(the key to hand out once, its lookup id, the digest to store)."""
    lookup_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}_{lookup_id}_{secret}", lookup_id, digest(lookup_id, secret)


def parse(key: str) -> tuple[str, str] | None:
    """(lookup id, secret) of a well-formed key, else None."""
    found = _KEY.fullmatch(key)
    return (found[1], found[2]) if found else None


async def create_key(
    conn: asyncpg.Connection,
    *,
    admin: bool = False,
    space_id: int | None = None,
    user_id: uuid.UUID | None = None,
) -> tuple[int, str]:
    """Store a new key's digest; (its id, the key itself, to be shown once)."""
    key, lookup_id, stored = new_key()
    key_id: int = await conn.fetchval(
        "INSERT INTO api_keys (lookup_id, digest, admin, search_space_id, user_id)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING id",
        lookup_id,
        stored,
        admin,
        space_id,
        user_id,
    )
    return key_id, key


async def list_keys(conn: asyncpg.Connection) -> list[StoredKey]:
    rows = await conn.fetch(
        "SELECT id, lookup_id, admin, search_space_id AS space_id, user_id, created_at,"
        " revoked_at FROM api_keys ORDER BY id"
    )
    return [StoredKey(**dict(row)) for row in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: int) -> bool | None:
    """Revoke a key: True if it was revoked now, False if it already was, None if unknown."""
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
        # now() is the transaction's start: equal only if this statement set it.
        " RETURNING revoked_at = now() AS now_revoked",
        key_id,
    )
    if row is None:
        return None
    return bool(row["now_revoked"])


async def authenticate(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> KeyScope | None:
    """The scope of a valid, unrevoked key; None for anything else (malformed, unknown,
    revoked or wrong), after the same work in every case."""
    parsed = parse(key)
    lookup_id, secret = parsed if parsed else ("0" * 16, "")
    row = await conn.fetchrow(
        "SELECT id, digest, admin, search_space_id, user_id FROM api_keys"
        " WHERE lookup_id = $1 AND revoked_at IS NULL",
        lookup_id,
    )
    expected = row["digest"] if row is not None else _NO_ROW_DIGEST
    matches = hmac.compare_digest(expected, digest(lookup_id, secret))
    if row is None or parsed is None or not matches:
        return None
    return KeyScope(row["id"], row["admin"], row["search_space_id"], row["user_id"])
