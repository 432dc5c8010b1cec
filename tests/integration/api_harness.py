"""The usage API as the tests meet it: a migrated ledger filled through the ledger's own write
path, `token-ledger serve` as a real process on a free port, its read-only login role, keys
made by `token-ledger api-key create`, and `token-ledger usage --format json` to compare with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from devstack.processes import free_port
from producer.events import AnyEvent
from tests.factories import appended, call, finalized, ledger_events

REPO = Path(__file__).resolve().parents[2]
API_ROLE = "token_ledger_api"
SPACE_A, SPACE_B = 7, 8
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000000a")
BOB = uuid.UUID("00000000-0000-4000-8000-00000000000b")
CAROL = uuid.UUID("00000000-0000-4000-8000-00000000000c")  # space B's only user
B_MODEL = "model-only-space-b-uses"
# factories.at(s) is 2026-11-26T09:15:00Z + s: the last millisecond of the 26th and the
# first instant of the 27th, in UTC.
LAST_MS_OF_DAY = 53_099.999
MIDNIGHT = 53_100.0
DAY = 86_400.0


def _turn(
    thread: int, turn: int, space: int, user: uuid.UUID | None, seconds: float, *calls: Any
) -> AnyEvent:
    return finalized(
        thread_id=thread,
        turn_id=f"{thread}:{turn}",
        space=space,
        user=user,
        seconds=seconds,
        calls=list(calls),
    )


def ledger_events_of_two_spaces() -> list[AnyEvent]:
    """Space A: two users, three models, token kinds, usage on both sides of a UTC midnight
    and of a month's end, a legacy append whose breakdown covers part of its totals (an
    `(unattributed)` share) and one without a user. Space B: one user and a model of its own."""
    return [
        _turn(101, 1, SPACE_A, ALICE, 0, call("gpt-4o", cost=1000, cached_tokens=20),
              call("claude-3", 30, 10, 40, 700)),
        _turn(101, 2, SPACE_A, ALICE, LAST_MS_OF_DAY, call("gpt-4o", 7, 3, 10, 111)),
        _turn(102, 1, SPACE_A, BOB, MIDNIGHT, call("gpt-4o-mini", 5, 5, 10, 50,
              reasoning_tokens=4)),
        _turn(102, 2, SPACE_A, BOB, MIDNIGHT + 4 * DAY + 1, call("gpt-4o", 1, 1, 2, 9)),
        appended(thread_id=103, turn_id=None, space=SPACE_A, user=None, seconds=2 * DAY,
                 cost=900, model="gpt-4o",
                 breakdown={"gpt-4o": {"prompt_tokens": 4, "cost_micros": 500}}),
        _turn(201, 1, SPACE_B, CAROL, MIDNIGHT + 4 * DAY, call(B_MODEL, 1000, 1000, 2000, 99_999)),
        _turn(201, 2, SPACE_B, CAROL, MIDNIGHT + 4 * DAY - 0.001, call(B_MODEL, 1, 1, 2, 3)),
    ]  # fmt: skip


async def set_budgets(ledger_url: str) -> dict[str, int]:
    """Budgets over the two spaces (their ids by name), set as `token-ledger budget set` sets
    them (current period judged at once), and one inserted without being judged. The `total`
    ones do not depend on today's date: A's cost 2,770 of 4,000 (50 % crossed), Bob's 12 of
    20 tokens (50 %), B's cost 100,002 of 50,000 (every threshold); Alice's is never judged,
    so none is crossed although her usage is over its limit."""
    from consumer.commands.budgets import BudgetChange, set_budget

    changes = {
        "a_total": BudgetChange(SPACE_A, None, "total", 4000, None, (50, 80, 100)),
        "a_month": BudgetChange(SPACE_A, None, "month", None, 1000, (50, 80, 100)),
        "alice_day": BudgetChange(SPACE_A, ALICE, "day", 10, None, (100,)),
        "bob_total": BudgetChange(SPACE_A, BOB, "total", None, 20, (50, 100)),
        "b_month": BudgetChange(SPACE_B, None, "month", 100_000, 1000, (50, 80, 100)),
        "b_total": BudgetChange(SPACE_B, None, "total", 50_000, None, (50, 80, 100)),
    }
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        async with conn.transaction():
            ids = {name: await set_budget(conn, change) for name, change in changes.items()}
            ids["alice_unjudged"] = await conn.fetchval(
                "INSERT INTO budgets (search_space_id, user_id, period, total_tokens_limit)"
                " VALUES ($1, $2, 'total', 1) RETURNING id",
                SPACE_A,
                ALICE,
            )
    finally:
        await conn.close()
    return ids


def cli_budgets(ledger_url: str, *args: str) -> list[dict[str, Any]]:
    """`token-ledger budget list --format json ARGS` as rows."""
    done = cli(ledger_url, "budget", "list", "--format", "json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def fill(ledger_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        async with conn.transaction():
            await apply_events(conn, ledger_events(ledger_events_of_two_spaces()))
    finally:
        await conn.close()


def cli(ledger_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_DATABASE_URL": ledger_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def create_key(ledger_url: str, *args: str) -> str:
    made = cli(ledger_url, "api-key", "create", *args)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]


def cli_usage(ledger_url: str, *args: str) -> list[dict[str, Any]]:
    """`token-ledger usage --format json ARGS` as rows (the total row last)."""
    done = cli(ledger_url, "usage", "--format", "json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@asynccontextmanager
async def login_role(ledger_url: str) -> AsyncIterator[str]:
    """A login role that is only a member of token_ledger_api; its URL (dropped afterwards)."""
    name, password = f"api_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    admin = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE {API_ROLE}")
        scheme, _, rest = ledger_url.partition("://")
        yield f"{scheme}://{name}:{password}@{rest.partition('@')[2]}"
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


class ApiServer:
    """`token-ledger serve` on a free port of 127.0.0.1."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_LOG_FORMAT": "json",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", "serve", "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start:\n{self.logs()[-4000:]}")
            time.sleep(0.1)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(env, log_path).start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()
