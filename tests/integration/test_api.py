"""`token-ledger serve` against a migrated ledger filled through the ledger's own write path:
every route and filter, answers equal to `token-ledger usage --format json`, UTC day
boundaries, pagination, and the service's own metrics and OpenAPI document
(docs/operations.md#the-usage-api)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from consumer.api.openapi import DOCUMENT
from consumer.commands.queries import REPORTED
from tests.conftest import _fresh_database
from tests.integration.api_harness import (
    ALICE,
    B_MODEL,
    BOB,
    SPACE_A,
    SPACE_B,
    ApiServer,
    cli,
    cli_usage,
    create_key,
    fill,
    login_role,
    serving,
)

MEASURES = (*REPORTED, "usage_rows")
NAMES = {"space": "space_id", "user": "user_id", "model": "model", "day": "day", "month": "month"}


@dataclass
class Api:
    ledger_url: str
    server: ApiServer
    admin: str = field(repr=False)  # keys stay out of failure reports
    space_a: str = field(repr=False)

    def get(self, key: str | None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.server.url}/v1/usage", params=params, headers=headers)

    def rows(self, key: str, **params: Any) -> list[dict[str, Any]]:
        """Every row, following the cursors."""
        rows, cursor = [], None
        while True:
            answer = self.get(key, **params, **({"cursor": cursor} if cursor else {}))
            assert answer.status_code == 200, answer.text
            page = answer.json()
            rows += page["rows"]
            if (cursor := page["next_cursor"]) is None:
                return rows


@pytest.fixture(scope="module")
async def api(
    postgres_url: str, ledger_template: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    async for ledger_url in _fresh_database(postgres_url, template=ledger_template):
        await fill(ledger_url)
        async with login_role(ledger_url) as api_url:
            env = {"LEDGER_DATABASE_URL": ledger_url, "LEDGER_API_DATABASE_URL": api_url}
            log = tmp_path_factory.mktemp("api") / "serve.log"
            with serving(env, log) as server:
                yield Api(
                    ledger_url,
                    server,
                    admin=create_key(ledger_url, "--admin"),
                    space_a=create_key(ledger_url, "--space", str(SPACE_A)),
                )


def as_api(group_by: list[str], cli_row: dict[str, Any]) -> dict[str, Any]:
    """A row of `token-ledger usage --format json` as the API names and types it."""
    row: dict[str, Any] = {}
    for name in group_by:
        value = cli_row[name]
        row[NAMES[name]] = int(value) if name == "space" else None if value == "(none)" else value
    return {**row, **{m: cli_row[m] for m in MEASURES}}


QUERIES: list[tuple[list[str], dict[str, str], list[str]]] = [
    # (group_by, API filters, the same filters for the CLI)
    ([], {}, []),
    (["model"], {}, []),
    (["user"], {}, []),
    (["space"], {}, []),
    (["day"], {}, []),
    (["month"], {}, []),
    (["space", "model", "day"], {}, []),
    (["user", "month"], {"space_id": str(SPACE_A)}, ["--space", str(SPACE_A)]),
    (["day", "model"], {"user_id": str(ALICE)}, ["--user", str(ALICE)]),
    (["day"], {"model": "gpt-4o"}, ["--model", "gpt-4o"]),
    ([], {"model": "gpt-4o"}, ["--model", "gpt-4o"]),
    (
        ["model"],
        {"from": "2026-11-27T00:00:00Z", "to": "2026-12-01T00:00:00Z"},
        ["--since", "2026-11-27T00:00:00Z", "--until", "2026-12-01T00:00:00Z"],
    ),
]


@pytest.mark.parametrize(("group_by", "params", "flags"), QUERIES)
def test_the_api_answers_as_the_usage_command_does(
    api: Api, group_by: list[str], params: dict[str, str], flags: list[str]
) -> None:
    by = [arg for name in group_by for arg in ("--by", name)] or ["--by", "space"]
    *groups, total = cli_usage(api.ledger_url, *by, *flags)
    expected = [as_api(group_by, row) for row in groups] if group_by else [as_api([], total)]
    got = api.rows(api.admin, **params, **({"group_by": ",".join(group_by)} if group_by else {}))
    assert got == expected
    assert got and any(row["total_tokens"] for row in got)


def test_a_model_split_sums_to_the_totals_with_the_unattributed_share(api: Api) -> None:
    (total,) = api.rows(api.admin, space_id=SPACE_A)
    by_model = api.rows(api.admin, space_id=SPACE_A, group_by="model")
    assert "(unattributed)" in {row["model"] for row in by_model}
    for measure in ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros"):
        assert sum(row[measure] for row in by_model) == total[measure]
    kinds = {row["model"]: (row["cached_tokens"], row["reasoning_tokens"]) for row in by_model}
    assert kinds["gpt-4o"] == (20, 0) and kinds["gpt-4o-mini"] == (0, 4)


def test_group_by_is_a_comma_list_or_repeated(api: Api) -> None:
    comma = api.get(api.admin, group_by="model,day").json()
    repeated = api.get(api.admin, group_by=["model", "day"]).json()
    both = api.get(api.admin, group_by=["model", "day"], limit=1000).json()
    assert comma == repeated == both
    assert list(comma["rows"][0])[:2] == ["model", "day"]


def test_days_and_months_are_utc_and_to_is_exclusive(api: Api) -> None:
    days = {row["day"]: row for row in api.rows(api.admin, space_id=SPACE_A, group_by="day")}
    # 23:59:59.999 belongs to the 26th, 00:00:00 to the 27th.
    assert days["2026-11-26"]["cost_micros"] == 1000 + 700 + 111
    assert days["2026-11-27"]["cost_micros"] == 50
    last_ms = {"from": "2026-11-26T23:59:59.999Z", "to": "2026-11-27T00:00:00Z"}
    (only_it,) = api.rows(api.admin, space_id=SPACE_A, **last_ms)
    assert (only_it["cost_micros"], only_it["usage_rows"]) == (111, 1)
    midnight = {"from": "2026-11-27T00:00:00Z", "to": "2026-11-27T00:00:00.001Z"}
    assert api.rows(api.admin, space_id=SPACE_A, **midnight)[0]["cost_micros"] == 50
    # The same instant written in another zone is the same bound.
    shifted = {"from": "2026-11-27T01:00:00+01:00", "to": "2026-11-27T01:00:00.001+01:00"}
    assert api.rows(api.admin, space_id=SPACE_A, **shifted)[0]["cost_micros"] == 50
    months = api.rows(api.admin, space_id=SPACE_B, group_by="month")
    assert [(m["month"], m["usage_rows"]) for m in months] == [("2026-11", 1), ("2026-12", 1)]


def test_pages_follow_their_cursor_to_the_same_rows(api: Api) -> None:
    whole = api.get(api.admin, group_by="space,model,day", limit=10_000).json()
    assert whole["next_cursor"] is None and len(whole["rows"]) > 5
    first = api.get(api.admin, group_by="space,model,day", limit=2).json()
    assert len(first["rows"]) == 2 and isinstance(first["next_cursor"], str)
    assert api.rows(api.admin, group_by="space,model,day", limit=2) == whole["rows"]
    # A cursor belongs to its grouping.
    other = api.get(api.admin, group_by="model", cursor=first["next_cursor"])
    assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_a_space_key_is_scoped_to_its_space_without_naming_it(api: Api) -> None:
    *_, total_a = cli_usage(api.ledger_url, "--space", str(SPACE_A))
    assert api.rows(api.space_a) == [as_api([], total_a)]
    assert {r["space_id"] for r in api.rows(api.space_a, group_by="space")} == {SPACE_A}
    assert B_MODEL not in {r["model"] for r in api.rows(api.space_a, group_by="model")}
    (mine,) = api.rows(api.space_a, space_id=SPACE_A)
    assert mine == as_api([], total_a)
    bob = api.rows(api.space_a, user_id=str(BOB))
    assert bob[0]["usage_rows"] == 2


def test_healthz_metrics_and_the_committed_openapi_document(api: Api) -> None:
    assert httpx.get(f"{api.server.url}/healthz").text == "ok"
    served = httpx.get(f"{api.server.url}/openapi.json").json()
    assert served == json.loads(DOCUMENT.read_text())
    assert served["openapi"].startswith("3.1")
    api.get(api.admin)
    api.get(None)
    httpx.get(f"{api.server.url}/no/such/path/{ALICE}")
    text = httpx.get(f"{api.server.url}/metrics").text
    assert 'token_ledger_api_requests_total{route="/v1/usage",status="200"}' in text
    assert 'token_ledger_api_requests_total{route="/v1/usage",status="401"}' in text
    assert 'token_ledger_api_requests_total{route="(unmatched)",status="404"}' in text
    assert 'token_ledger_api_request_seconds_bucket{le="0.005",route="/v1/usage"}' in text
    assert str(ALICE) not in text and "/no/such" not in text  # templates, never paths
    assert api.admin not in api.server.logs() and api.space_a not in api.server.logs()


def test_the_committed_document_is_current() -> None:
    from consumer.api.openapi import text

    assert DOCUMENT.read_text() == text(), "run python -m consumer.api.openapi"


async def test_a_slow_query_answers_503_at_its_statement_timeout(api: Api, tmp_path: Path) -> None:
    import asyncpg

    from consumer.ledger.database import asyncpg_dsn

    env = {"LEDGER_DATABASE_URL": api.ledger_url, "LEDGER_API_STATEMENT_TIMEOUT": "0.3"}
    with serving(env, tmp_path / "serve.log") as slow:
        blocker = await asyncpg.connect(asyncpg_dsn(api.ledger_url))
        try:
            async with blocker.transaction():
                # Held until the end of the block: every read of token_usage waits on it.
                await blocker.execute("LOCK TABLE token_usage IN ACCESS EXCLUSIVE MODE")
                async with httpx.AsyncClient() as client:
                    answer = await client.get(
                        f"{slow.url}/v1/usage",
                        headers={"Authorization": f"Bearer {api.admin}"},
                        timeout=10,
                    )
        finally:
            await blocker.close()
        assert answer.status_code == 503
        assert "statement timeout (0.3s)" in answer.json()["detail"]
        after = await asyncio.to_thread(
            httpx.get, f"{slow.url}/v1/usage", headers={"Authorization": f"Bearer {api.admin}"}
        )
        assert after.status_code == 200
        # Started with the ledger's own role: it says so, and that the role can write.
        logs = slow.logs()
        assert "LEDGER_API_DATABASE_URL is not set" in logs
        assert "role can write" in logs
    assert "role can write" not in api.server.logs()


def test_serve_exits_0_on_sigterm_and_2_on_a_port_it_cannot_bind(api: Api, tmp_path: Path) -> None:
    taken = cli(api.ledger_url, "serve", "--port", str(api.server.port))  # already listening
    assert taken.returncode == 2
    assert f"cannot listen on 127.0.0.1:{api.server.port}" in taken.stderr
    with serving({"LEDGER_DATABASE_URL": api.ledger_url}, tmp_path / "serve.log") as server:
        assert server.stop() == 0
