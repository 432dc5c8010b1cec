"""The usage API under `make bench`: its latency over a large ledger, and what its index costs
the consumer.

- Latency: a ledger of `rows` usage rows in `spaces` search spaces (each with its thread and
  its assistant message, as a turn.finalized writes them), loaded set-based into a database of
  the benchmark's own PostgreSQL, not through Kafka: a million rows in under a minute, where
  draining the ~2.7 million records that make as many would take minutes more at every run.
  Then the real `token-ledger serve` of the candidate tree, as a subprocess with a login role
  in `token_ledger_api` and a key from `token-ledger api-key create`, and `requests`
  sequential GET /v1/usage of one space's month by day by model, each for another space,
  timed from the client (the whole HTTP exchange, on a kept-alive connection): p50 and p99
  per run (docs/development.md#the-usage-api).
- The index's cost: first drains of the candidate into an empty ledger with its own indexes,
  and with token_usage's space index as it was before the usage API (0007's
  `ix_token_usage_search_space_id_source_at` dropped, the (search_space_id, created_at) index
  that 0009 dropped for it restored), interleaved run by run on the same backlog; each run's
  pair gives the rate the change costs.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.consumers import PYTHON, Consumer, Tree
from bench.latency import percentile
from bench.report import (
    API,
    API_LOAD,
    INDEX,
    INDEX_COST,
    INDEXED,
    LOST,
    REPLACED,
    UNINDEXED,
    Results,
    rate_lost,
)
from bench.services import Databases, Services
from consumer.ledger.database import asyncpg_dsn
from devstack.processes import free_port

TURNS_PER_THREAD = 10
USERS_PER_SPACE = 20
START = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 91  # October to December: the measured month, November, has usage on each side
MONTH = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
WARM_UP = 5  # requests before the measured ones: the pool's first connections, not the query
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "gemini-1.5-pro", "o3-mini"]
ROLE, PASSWORD = "bench_api", "bench_api"

# One transaction of three INSERT … SELECT over generate_series. Replica mode skips the
# triggers (the billing outbox: not what the API reads) and the foreign-key checks (the rows
# are consistent by construction). Usage row i is turn (i-1) % TURNS of thread 1 + (i-1)/TURNS,
# with message i; a thread's turns are 10 minutes apart, from a time its id spreads over DAYS
# (Knuth's multiplicative hash), so that each space has usage on most days of the month.
_THREADS = """
INSERT INTO chat_threads (id, search_space_id, created_by_id, created_at, updated_at)
SELECT t, 1 + (t - 1) % $2, md5((1 + (t - 1) % $2) || ':' || t % $3)::uuid, $4, $4
FROM generate_series(1, $1::bigint) AS t
"""
_MESSAGES = """
INSERT INTO chat_messages (id, thread_id, role, turn_id, content, content_rank, content_at,
  content_event_id, created_at, updated_at)
SELECT i, t.thread, 'assistant', t.thread || ':' || (i - 1) % $2,
  '[{"type": "text", "text": "Revenue grew 12% quarter on quarter, mostly in the new region."}]',
  2, at, gen_random_uuid(), at, at
FROM generate_series(1, $1::bigint) AS i,
  LATERAL (SELECT 1 + (i - 1) / $2 AS thread) AS t,
  LATERAL (SELECT $3::timestamptz + (t.thread * 2654435761 % ($4 * 86400) + (i - 1) % $2 * 600)
                  * interval '1 second' AS at) AS r
"""
_USAGE = """
INSERT INTO token_usage (id, prompt_tokens, completion_tokens, total_tokens, cost_micros,
  model_breakdown, call_details, thread_id, message_id, search_space_id, user_id, source,
  source_rank, source_at, source_event_id, created_at, updated_at)
SELECT i, a.p + b.p, a.c + b.c, a.p + a.c + b.p + b.c, a.cost + b.cost,
  jsonb_build_object(a.model, jsonb_build_object('prompt_tokens', a.p, 'completion_tokens', a.c,
      'total_tokens', a.p + a.c, 'cost_micros', a.cost, 'cached_tokens', a.p / 4))
    || CASE WHEN b.p > 0 THEN jsonb_build_object(b.model, jsonb_build_object('prompt_tokens',
      b.p, 'completion_tokens', b.c, 'total_tokens', b.p + b.c, 'cost_micros', b.cost))
      ELSE '{}' END,
  jsonb_build_array(jsonb_build_object('model', a.model, 'prompt_tokens', a.p,
    'completion_tokens', a.c, 'total_tokens', a.p + a.c, 'cost_micros', a.cost,
    'call_kind', 'chat', 'latency_ms', i % 2000, 'request_id', md5(i::text))),
  r.thread, i, r.space, md5(r.space || ':' || r.thread % $4)::uuid, 'turn.finalized', 2, r.at,
  gen_random_uuid(), r.at, r.at
FROM generate_series(1, $1::bigint) AS i,
  LATERAL (SELECT 1 + (i - 1) / $2 AS thread, 1 + ((i - 1) / $2) % $3 AS space) AS t,
  LATERAL (SELECT t.*, $5::timestamptz + (t.thread * 2654435761 % ($6 * 86400)
                  + (i - 1) % $2 * 600) * interval '1 second' AS at) AS r,
  LATERAL (SELECT ($7::text[])[1 + i % 5] AS model, 100 + i % 900 AS p, 20 + i % 300 AS c,
                  (100 + i % 900) * 2 + (20 + i % 300) * 8 AS cost) AS a,
  LATERAL (SELECT ($7::text[])[1 + (i + 2) % 5] AS model,
                  CASE WHEN i % 3 = 0 THEN 40 + i % 60 ELSE 0 END AS p,
                  CASE WHEN i % 3 = 0 THEN 10 ELSE 0 END AS c,
                  CASE WHEN i % 3 = 0 THEN 95 ELSE 0 END AS cost) AS b
"""


async def load_ledger(url: str, rows: int, spaces: int) -> None:
    """`rows` usage rows (and their threads and messages) in `spaces` spaces, analysed."""
    threads = -(-rows // TURNS_PER_THREAD)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(_THREADS, threads, spaces, USERS_PER_SPACE, START)
            await conn.execute(_MESSAGES, rows, TURNS_PER_THREAD, START, DAYS)
            await conn.execute(
                _USAGE, rows, TURNS_PER_THREAD, spaces, USERS_PER_SPACE, START, DAYS, MODELS
            )
            for table in ("chat_messages", "token_usage"):  # as the consumer's inserts leave them
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {rows})"
                )
        # As autovacuum leaves a table that stopped growing: hint bits set, statistics known.
        await conn.execute("VACUUM (ANALYZE) chat_threads, chat_messages, token_usage")
    finally:
        await conn.close()


def request_spaces(spaces: int, requests: int, run: int) -> list[int]:
    """The spaces of one run's requests: distinct while there are enough, another draw per
    run (the same in every benchmark)."""
    draw = random.Random(run)
    chosen: list[int] = []
    while len(chosen) < requests:
        chosen += draw.sample(range(1, spaces + 1), min(spaces, requests - len(chosen)))
    return chosen


def month_by_day_by_model(space: int) -> dict[str, Any]:
    """GET /v1/usage's parameters (consumer/api/routes.py) for one space's November."""
    return {
        "space_id": space,
        "from": MONTH[0].isoformat().replace("+00:00", "Z"),
        "to": MONTH[1].isoformat().replace("+00:00", "Z"),
        "group_by": ["day", "model"],
    }


@dataclass(frozen=True)
class Answers:
    p50_ms: float
    p99_ms: float
    max_ms: float
    groups: int  # rows of the answers, all requests together


async def time_requests(base: str, key: str, spaces: list[int]) -> Answers:
    headers = {"Authorization": f"Bearer {key}"}
    seconds: list[float] = []
    groups = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        for index, space in enumerate(spaces):
            started = time.perf_counter()
            answer = await client.get("/v1/usage", params=month_by_day_by_model(space))
            elapsed = time.perf_counter() - started
            if answer.status_code != 200:
                raise RuntimeError(f"GET /v1/usage: {answer.status_code} {answer.text[:500]}")
            if index >= WARM_UP:
                seconds.append(elapsed)
                groups += len(answer.json()["rows"])
    return Answers(
        p50_ms=percentile(seconds, 0.5) * 1000,
        p99_ms=percentile(seconds, 0.99) * 1000,
        max_ms=max(seconds) * 1000,
        groups=groups,
    )


def _login(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{ROLE}:{PASSWORD}@{rest.partition('@')[2]}"


async def _api_role(url: str) -> str:
    """The URL of a login role that is only a member of token_ledger_api, as an operator
    gives `serve` (docs/operations.md#the-usage-api)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", ROLE):
            await conn.execute(
                f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}' IN ROLE token_ledger_api"
            )
    finally:
        await conn.close()
    return _login(url)


async def _month_cost(url: str) -> tuple[int, int]:
    """A space with usage in the month, and the month's cost of its usage."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow(
            "SELECT search_space_id, sum(cost_micros) AS cost FROM token_usage"
            " WHERE search_space_id = (SELECT min(search_space_id) FROM token_usage"
            "   WHERE source_at >= $1 AND source_at < $2)"
            " AND source_at >= $1 AND source_at < $2 GROUP BY 1",
            *MONTH,
        )
    finally:
        await conn.close()
    if row is None:
        raise RuntimeError("the loaded ledger has no usage in the month")
    return row["search_space_id"], int(row["cost"])


async def _check_answer(base: str, key: str, url: str) -> None:
    """The answers timed are the ledger's, not fast errors: one space's month, summed."""
    space, cost = await _month_cost(url)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        answer = await client.get(
            "/v1/usage",
            params=month_by_day_by_model(space),
            headers={"Authorization": f"Bearer {key}"},
        )
    if sum(row["cost_micros"] for row in answer.json()["rows"]) != cost:
        raise RuntimeError(f"the API's month of space {space} is not the ledger's: {answer.text}")


class Serving:
    """`token-ledger serve` of a code tree, on a free port, as an operator starts it."""

    def __init__(self, tree: Tree, services: Services, url: str, api_url: str) -> None:
        self.tree = tree
        self.env = Consumer(tree, services, url, "bench.api", "bench-api").env(
            LEDGER_API_DATABASE_URL=api_url
        )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def key(self) -> str:
        """A new admin key, from `token-ledger api-key create` (its last line)."""
        made = subprocess.run(
            [PYTHON, "-m", "consumer", "api-key", "create", "--admin"],
            cwd=self.tree.path,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise RuntimeError(f"api-key create: exit {made.returncode}\n{made.stderr[-3000:]}")
        return made.stdout.splitlines()[-1]

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as out:
            return subprocess.Popen(
                [PYTHON, "-m", "consumer", "serve", "--port", str(self.port)],
                cwd=self.tree.path,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start(self) -> str:
        """Start it; its base URL once /healthz answers."""
        self.process = process = self._spawn()
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=self.base, timeout=1) as client:
            while True:  # until it answers: nothing else says it listens
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return self.base
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start:\n{self._tail()}")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        if self.process.wait(timeout=30) != 0:
            raise RuntimeError(f"serve exited {self.process.returncode}:\n{self._tail()}")
        self.log.unlink()

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@dataclass(frozen=True)
class ApiPlan:
    rows: int
    spaces: int
    requests: int
    runs: int


async def measure_api(
    services: Services, databases: Databases, results: Results, tree: Tree, plan: ApiPlan
) -> None:
    """Load the ledger, serve it, and time `plan.requests` requests per run."""
    results.api = (
        f"{plan.rows:,} usage rows in {plan.spaces:,} spaces, {plan.requests} requests a run"
        " one after another, each timed at the client"
    )
    url = await databases.fresh()
    try:
        started = time.monotonic()
        await load_ledger(url, plan.rows, plan.spaces)
        loaded = time.monotonic() - started
        results.add(API_LOAD, "seconds", loaded, tree.name)
        print(f"usage API: {plan.rows:,} usage rows in {plan.spaces:,} spaces, {loaded:.0f} s")
        serving = Serving(tree, services, url, await _api_role(url))
        key = serving.key()
        base = await serving.start()
        try:
            await _check_answer(base, key, url)
            for run in range(plan.runs):
                spaces = request_spaces(plan.spaces, WARM_UP + plan.requests, run)
                answers = await time_requests(base, key, spaces)
                results.add(API, "p50 ms", answers.p50_ms, tree.name)
                results.add(API, "p99 ms", answers.p99_ms, tree.name)
                results.add(API, "max ms", answers.max_ms, tree.name)
                results.add(API, "groups per answer", answers.groups / plan.requests, tree.name)
                print(f"usage API run {run + 1}: {answers}", flush=True)
        finally:
            serving.stop()
    finally:
        await databases.drop(url)


async def _index(url: str, *, keep: bool) -> None:
    """The candidate's space index, or the one it replaced, and check it: both sides connect
    once before their drain (the first connection to a new database builds its catalog caches,
    ~10 ms here)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if not keep:
            await conn.execute(f"DROP INDEX {INDEX}")
            await conn.execute(
                f"CREATE INDEX {REPLACED} ON token_usage (search_space_id, created_at)"
            )
        for name, meant in ((INDEX, keep), (REPLACED, not keep)):
            found = await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE indexname = $1", name
            )
            if found != meant:
                raise RuntimeError(f"{name}: {found} where {int(meant)} was meant")
    finally:
        await conn.close()


async def index_cost(
    databases: Databases,
    results: Results,
    consumer: Callable[[Tree, str, str], Consumer],  # Bench.consumer: a group of its own
    tree: Tree,
    topic: str,
    records: int,
    runs: int,
) -> None:
    """First drains with the index and without it, in alternating order run by run; each run's
    pair gives the index's cost, the rate it loses (the two drains of a run see the same
    machine: the pairs, not the medians of each side, take out what else runs on it)."""
    for run in range(runs):
        rates: dict[bool, float] = {}
        for indexed in (True, False) if run % 2 == 0 else (False, True):
            url = await databases.fresh()
            await _index(url, keep=indexed)
            drain = await consumer(tree, url, topic).drain()
            await databases.drop(url)
            scenario = INDEXED if indexed else UNINDEXED
            rates[indexed] = records / drain.seconds
            results.add(scenario, "events/s", rates[indexed], tree.name)
            results.add(
                scenario, "consumer CPU µs/event", drain.cpu_seconds / records * 1e6, tree.name
            )
            results.add(
                scenario, "PostgreSQL µs/event", drain.pg_cpu_seconds / records * 1e6, tree.name
            )
            print(f"index cost run {run + 1}, {scenario}: {drain}", flush=True)
        results.add(INDEX_COST, LOST, rate_lost(rates[True], rates[False]), tree.name)
