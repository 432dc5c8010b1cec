"""The usage API between tenants and against hostile input: a key of space A with ids of space
B never returns B's data (404), injection attempts and oversized or malformed parameters get
422 naming the parameter (never a 5xx, never data), a revoked key 401, the keys themselves
(stored as digests, shown once), the database role `serve` uses (it cannot write), and a
property-based test generated from the OpenAPI document against the live server
(docs/operations.md#the-usage-api)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.models import metadata
from tests.conftest import _fresh_database
from tests.integration.api_harness import (
    ALICE,
    B_MODEL,
    BOB,
    CAROL,
    SPACE_A,
    SPACE_B,
    ApiServer,
    cli,
    create_key,
    fill,
    login_role,
    serving,
    set_budgets,
)


@dataclass
class Tenants:
    ledger_url: str
    api_url: str
    server: ApiServer
    admin: str = field(repr=False)
    space_a: str = field(repr=False)
    alice: str = field(repr=False)  # space A, user Alice only
    budgets: dict[str, int] = field(default_factory=dict)  # api_harness.set_budgets

    def get(self, key: str | None, path: str = "/v1/usage", **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.get(f"{self.server.url}{path}", params=params, headers=headers)


@pytest.fixture(scope="module")
async def tenants(
    postgres_url: str, ledger_template: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Tenants]:
    async for ledger_url in _fresh_database(postgres_url, template=ledger_template):
        await fill(ledger_url)
        budgets = await set_budgets(ledger_url)
        async with login_role(ledger_url) as api_url:
            env = {"LEDGER_DATABASE_URL": ledger_url, "LEDGER_API_DATABASE_URL": api_url}
            with serving(env, tmp_path_factory.mktemp("api") / "serve.log") as server:
                yield Tenants(
                    ledger_url,
                    api_url,
                    server,
                    admin=create_key(ledger_url, "--admin"),
                    space_a=create_key(ledger_url, "--space", str(SPACE_A)),
                    alice=create_key(ledger_url, "--space", str(SPACE_A), "--user", str(ALICE)),
                    budgets=budgets,
                )


def _no_data_of_b(answer: httpx.Response) -> None:
    for secret in (B_MODEL, str(CAROL), '"space_id":8', "99999", "100002"):
        assert secret not in answer.text, (secret, answer.text)


B_IDS: list[dict[str, Any]] = [
    {"space_id": SPACE_B},
    {"space_id": SPACE_B, "group_by": "model"},
    {"user_id": str(CAROL)},
    {"user_id": str(CAROL), "space_id": SPACE_A},
    {"space_id": SPACE_B, "user_id": str(CAROL), "group_by": "day,model"},
    {"user_id": str(uuid.uuid4())},  # nobody's: the same answer as another tenant's user
]


@pytest.mark.parametrize("params", B_IDS)
def test_a_space_key_with_ids_of_another_space_gets_404(
    tenants: Tenants, params: dict[str, Any]
) -> None:
    for key in (tenants.space_a, tenants.alice):
        answer = tenants.get(key, **params)
        assert answer.status_code == 404, answer.text
        assert answer.json() == {"detail": "not found"}
    # The admin key sees B (so the 404 above is the scope, not an empty ledger).
    assert tenants.get(tenants.admin, **params).status_code == 200


def test_a_user_key_sees_only_its_user(tenants: Tenants) -> None:
    assert tenants.get(tenants.alice, user_id=str(BOB)).status_code == 404
    rows = tenants.get(tenants.alice, group_by="user,space").json()["rows"]
    assert [(r["space_id"], r["user_id"]) for r in rows] == [(SPACE_A, str(ALICE))]


def test_what_a_space_key_sees_never_includes_b(tenants: Tenants) -> None:
    for group_by in ("space", "user", "model", "day", "month", "space,user,model,day,month"):
        answer = tenants.get(tenants.space_a, group_by=group_by, limit=10_000)
        assert answer.status_code == 200
        _no_data_of_b(answer)
    # A model of B as a filter: A's usage of it, which is none.
    (nothing,) = tenants.get(tenants.space_a, model=B_MODEL).json()["rows"]
    assert nothing["usage_rows"] == 0 and nothing["cost_micros"] == 0


def test_a_space_key_never_gets_another_space_s_budgets(tenants: Tenants) -> None:
    b_ids = [tenants.budgets["b_month"], tenants.budgets["b_total"]]
    for key in (tenants.space_a, tenants.alice):
        for path in (*(f"/v1/budgets/{i}" for i in b_ids), "/v1/budgets/999999"):
            answer = tenants.get(key, path)
            assert (answer.status_code, answer.json()) == (404, {"detail": "not found"}), path
        answer = tenants.get(key, "/v1/budgets", space_id=SPACE_B)
        assert (answer.status_code, answer.json()) == (404, {"detail": "not found"})
        listed = tenants.get(key, "/v1/budgets", limit=1000)
        assert listed.status_code == 200
        _no_data_of_b(listed)
        assert not {row["id"] for row in listed.json()["rows"]} & set(b_ids)
    # A user's key: the space-wide budgets and its own, never another user's.
    assert (
        tenants.get(tenants.alice, f"/v1/budgets/{tenants.budgets['bob_total']}").status_code == 404
    )
    # The admin key sees B's (so the 404s above are the scope, not missing budgets).
    for budget_id in b_ids:
        assert tenants.get(tenants.admin, f"/v1/budgets/{budget_id}").status_code == 200


def test_missing_malformed_unknown_and_revoked_keys_get_401(tenants: Tenants) -> None:
    made = cli(tenants.ledger_url, "api-key", "create", "--space", str(SPACE_B))
    key = made.stdout.splitlines()[-1]
    assert tenants.get(key).status_code == 200
    key_id = next(
        line.split()[2] for line in made.stdout.splitlines() if line.startswith("API key ")
    )
    revoked = cli(tenants.ledger_url, "api-key", "revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    lookup, secret = key.split("_")[1], key.split("_", 2)[2]
    for bad in (key, "x", f"tl_{lookup}_{secret[:-1]}A", f"tl_{'0' * 16}_{secret}", key * 50):
        answer = tenants.get(bad, space_id=SPACE_B)
        assert answer.status_code == 401, bad
        assert answer.headers["www-authenticate"] == "Bearer"
    assert tenants.get(None).status_code == 401
    basic = httpx.get(f"{tenants.server.url}/v1/usage", headers={"Authorization": f"Basic {key}"})
    assert basic.status_code == 401
    # Checked before the parameters: nobody probes them without a key.
    assert tenants.get(None, limit="many").status_code == 401
    assert cli(tenants.ledger_url, "api-key", "revoke", "999999").returncode == 2


INJECTIONS = [
    "1 OR 1=1",
    "'; DROP TABLE token_usage; --",
    "7) OR (1=1",
    '" OR ""="',
    "8 UNION SELECT * FROM api_keys",
    "\x00",
    "${jndi:ldap://x}",
    "../../../etc/passwd",
]
TYPED = ("from", "to", "space_id", "user_id", "limit", "cursor", "group_by")


@pytest.mark.parametrize("parameter", TYPED)
def test_injection_attempts_in_typed_parameters_get_422_naming_them(
    tenants: Tenants, parameter: str
) -> None:
    for attempt in INJECTIONS:
        answer = tenants.get(tenants.space_a, **{parameter: attempt})
        assert answer.status_code == 422, (attempt, answer.text)
        assert {tuple(e["loc"][:2]) for e in answer.json()["detail"]} == {("query", parameter)}


@pytest.mark.parametrize("parameter", ["space_id", "limit", "cursor"])
def test_injection_attempts_in_budget_parameters_get_422_naming_them(
    tenants: Tenants, parameter: str
) -> None:
    for attempt in INJECTIONS:
        answer = tenants.get(tenants.space_a, "/v1/budgets", **{parameter: attempt})
        assert answer.status_code == 422, (attempt, answer.text)
        assert {tuple(e["loc"][:2]) for e in answer.json()["detail"]} == {("query", parameter)}


def test_injection_attempts_as_a_budget_id_get_422_naming_it(tenants: Tenants) -> None:
    for attempt in INJECTIONS:
        answer = tenants.get(tenants.space_a, f"/v1/budgets/{quote(attempt, safe='')}")
        if "/" in attempt:  # the path has more segments: no route, and nothing read
            assert answer.status_code == 404, (attempt, answer.text)
            continue
        assert answer.status_code == 422, (attempt, answer.text)
        assert {tuple(e["loc"]) for e in answer.json()["detail"]} == {("path", "id")}


async def test_injection_attempts_in_the_model_find_nothing_and_change_nothing(
    tenants: Tenants,
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(tenants.ledger_url))
    try:
        before = await conn.fetchval("SELECT count(*) FROM token_usage")
        for attempt in INJECTIONS:
            answer = tenants.get(tenants.space_a, model=attempt, group_by="model")
            if "\x00" in attempt:
                assert answer.status_code == 422
                continue
            assert answer.json() == {"rows": [], "next_cursor": None}, attempt
        assert await conn.fetchval("SELECT count(*) FROM token_usage") == before
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"model": "m" * 1001}, "model"),
        ({"cursor": "a" * 8193}, "cursor"),
        ({"cursor": "eyJnIjpbXSwiYSI6W119"}, "cursor"),  # a cursor of no grouping
        ({"limit": 10_001}, "limit"),
        ({"limit": 0}, "limit"),
        ({"space_id": 2**63}, "space_id"),
        ({"space_id": 0}, "space_id"),
        ({"group_by": ["model"] * 6}, "group_by"),
        ({"group_by": "model,model"}, "group_by"),
        ({"group_by": "planet"}, "group_by"),
        ({"group_by": "x" * 65}, "group_by"),
        ({"from": "2026-11-26T00:00:00"}, "from"),  # no zone
        ({"from": "2026-11-26"}, "from"),
        ({"from": "1764115200"}, "from"),  # a Unix timestamp is not RFC 3339
        ({"to": "2026-13-01T00:00:00Z"}, "to"),
        ({"to": "0001-01-01T00:00:00+01:00"}, "to"),  # before year 1 in UTC
        ({"from": "2026-11-27T00:00:00Z", "to": "2026-11-27T00:00:00Z"}, "to"),
        ({"user_id": "not-a-uuid"}, "user_id"),
    ],
)
def test_oversized_and_malformed_parameters_get_422_naming_them(
    tenants: Tenants, params: dict[str, Any], named: str
) -> None:
    answer = tenants.get(tenants.admin, **params)
    assert answer.status_code == 422, answer.text
    assert ["query", named] in [e["loc"][:2] for e in answer.json()["detail"]]


def test_an_oversized_request_is_refused_before_the_application(tenants: Tenants) -> None:
    """A request line past what uvicorn takes (HTTP clients refuse to send one: a raw socket)."""
    port = int(tenants.server.url.rpartition(":")[2])
    request = f"GET /v1/usage?model={'m' * 100_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except ConnectionError:
            return  # refused before it was even read
        status_line = sock.makefile("rb").readline().decode()
    assert status_line == "" or 400 <= int(status_line.split()[1]) < 500, status_line
    assert tenants.get(tenants.admin).status_code == 200  # and the server goes on


def test_keys_are_stored_as_digests_and_listed_without_them(tenants: Tenants) -> None:
    listed = cli(tenants.ledger_url, "api-key", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    for key in (tenants.admin, tenants.space_a, tenants.alice):
        secret = key.split("_", 2)[2]
        assert secret not in listed.stdout
        assert f"tl_{key.split('_')[1]}_" in listed.stdout  # the prefix identifies it
    assert f"space {SPACE_A} user {ALICE}" in listed.stdout
    dump = cli(tenants.ledger_url, "api-key", "create", "--admin", "--space", "1")
    assert dump.returncode == 2
    assert cli(tenants.ledger_url, "api-key", "create", "--user", str(ALICE)).returncode == 2


async def test_the_role_of_serve_cannot_write_any_ledger_table(tenants: Tenants) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(tenants.api_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM token_usage") > 0
        assert await conn.fetchval("SELECT count(*) FROM api_keys") > 0
        for table in sorted(metadata.tables):
            for statement in (
                f"INSERT INTO {table} DEFAULT VALUES",
                f"UPDATE {table} SET {next(iter(metadata.tables[table].c)).name} = NULL",
                f"DELETE FROM {table}",
                f"TRUNCATE {table}",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(statement)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE planted (x int)")
    finally:
        await conn.close()


# -- generated from the OpenAPI document ---------------------------------------------------

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_answer_matches_the_document_and_none_is_a_5xx(tenants: Tenants) -> None:
    """Requests generated from the document the live server serves, each sent with an admin
    key and a space key (schemathesis' strategies driven by hypothesis directly: its pytest
    plugin does not load a schema from a module-scoped fixture on this pytest)."""
    document = schemathesis.openapi.from_url(f"{tenants.server.url}/openapi.json")
    operations = []
    for result in document.get_all_operations():
        assert isinstance(result, Ok), result  # an operation the document cannot describe
        operations.append(result.ok())
    assert {op.path for op in operations} == {
        "/v1/usage",
        "/v1/budgets",
        "/v1/budgets/{id}",
        "/healthz",
        "/metrics",
    }
    examples = {"/v1/usage": 60, "/v1/budgets": 30, "/v1/budgets/{id}": 30}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples.get(operation.path, 5),
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def each(case: Any) -> None:
            for key in (tenants.admin, tenants.space_a):
                case.call_and_validate(
                    base_url=tenants.server.url,
                    headers={"Authorization": f"Bearer {key}"},
                    checks=CHECKS,
                )

        each()
