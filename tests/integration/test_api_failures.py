"""The usage API when its input or its database misbehaves: a crafted cursor is 422 naming
it, a role at its connection limit is 503, a database that stops answering is 503 within a
bounded time and SIGTERM still ends `serve` (docs/operations.md#the-usage-api)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from consumer.ledger.database import asyncpg_dsn
from tests.integration.api_harness import SPACE_A, create_key, fill, login_role, serving
from tests.integration.test_api_isolation import Tenants, tenants  # noqa: F401


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _raw_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        _cursor({"g": ["model"], "a": ["\ud800"]}),  # a lone surrogate, as JSON escapes it
        _raw_cursor("[" * 5000),  # nesting past Python's recursion limit
    ],
    ids=["lone-surrogate", "deep-nesting"],
)
def test_a_crafted_cursor_is_422_naming_cursor_never_500(
    tenants: Tenants,  # noqa: F811
    cursor: str,
) -> None:
    assert len(cursor) <= 8192
    for key in (tenants.admin, tenants.space_a):
        answer = tenants.get(key, group_by="model", cursor=cursor)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == ["query", "cursor"]


async def test_a_role_over_its_connection_limit_is_503_not_500(
    tenants: Tenants,  # noqa: F811
) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(tenants.ledger_url))
    role = tenants.api_url.split("://")[1].split(":")[0]
    try:
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        answers = [
            (await asyncio.to_thread(tenants.get, tenants.space_a)).status_code for _ in range(3)
        ]
    finally:
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        await admin.close()
    assert set(answers) == {503}
    # Back within its limit: answered again.
    assert (await asyncio.to_thread(tenants.get, tenants.space_a)).status_code == 200


async def _api_backends(ledger_url: str) -> list[int]:
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'token-ledger-api'"
        )
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


async def test_a_database_that_stops_answering_is_503_in_bounded_time_and_sigterm_exits(
    ledger_url: str, tmp_path: Path
) -> None:
    await fill(ledger_url)
    key = await asyncio.to_thread(create_key, ledger_url, "--space", str(SPACE_A))
    headers = {"Authorization": f"Bearer {key}"}
    async with login_role(ledger_url) as api_url:
        env = {
            "LEDGER_DATABASE_URL": ledger_url,
            "LEDGER_API_DATABASE_URL": api_url,
            "LEDGER_API_STATEMENT_TIMEOUT": "1",
        }
        with serving(env, tmp_path / "serve.log") as server:
            answer = await asyncio.to_thread(httpx.get, f"{server.url}/v1/usage", headers=headers)
            assert answer.status_code == 200
            pids = await _api_backends(ledger_url)
            assert pids
            for pid in pids:  # its backends stop answering (a frozen host, a partition)
                os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                answer = await asyncio.to_thread(
                    httpx.get, f"{server.url}/v1/usage", headers=headers, timeout=30
                )
                waited = time.monotonic() - started
                assert answer.status_code == 503, answer.text
                assert waited < 15  # the statement timeout (1 s) and the client-side bounds
                assert server.process is not None
                server.process.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(server.process.wait, 20) == 0
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
