"""`GET /v1/budgets` and `GET /v1/budgets/{id}` against the live `serve`: the answers of
`token-ledger budget list --format json` for the same budgets, each key's scope, keyset pages,
422 naming the parameter, and the route's template in the metrics
(docs/operations.md#the-usage-api). Tenant isolation and injection: test_api_isolation.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.api_harness import ALICE, SPACE_A, SPACE_B, cli_budgets
from tests.integration.test_api_isolation import Tenants, tenants  # noqa: F401


def expected(row: dict[str, Any]) -> dict[str, Any]:
    """A row of `budget list --format json` as the API's documented shape, written out here
    rather than taken from the code under test."""
    crossed = []
    for entry in row["crossed"]:
        measure, threshold = entry.split(":")
        crossed.append({"measure": measure, "threshold": int(threshold)})
    return {
        "id": row["id"],
        "space_id": row["search_space_id"],
        "user_id": row["user_id"],
        "period": row["period"],
        "limits": {
            "cost_micros": row["cost_micros_limit"],
            "total_tokens": row["total_tokens_limit"],
        },
        "thresholds": row["thresholds"],
        "period_start": row["period_start"],
        "spend": {"cost_micros": row["cost_micros"], "total_tokens": row["total_tokens"]},
        "crossed": crossed,
    }


def every(tenants: Tenants, key: str, **params: Any) -> list[dict[str, Any]]:  # noqa: F811
    """Every budget the key lists, following the cursors."""
    rows, cursor = [], None
    while True:
        answer = tenants.get(key, "/v1/budgets", **params, **({"cursor": cursor} if cursor else {}))
        assert answer.status_code == 200, answer.text
        rows += answer.json()["rows"]
        if (cursor := answer.json()["next_cursor"]) is None:
            return rows


def test_the_list_answers_as_budget_list_does(tenants: Tenants) -> None:  # noqa: F811
    listed = cli_budgets(tenants.ledger_url)
    assert [row["id"] for row in listed] == sorted(tenants.budgets.values())
    assert every(tenants, tenants.admin, limit=2) == [expected(row) for row in listed]
    of_b = cli_budgets(tenants.ledger_url, "--space", str(SPACE_B))
    assert every(tenants, tenants.admin, space_id=SPACE_B) == [expected(row) for row in of_b]
    # The figures that do not depend on today's date (api_harness.set_budgets).
    by_id = {row["id"]: row for row in every(tenants, tenants.admin)}
    a_total = by_id[tenants.budgets["a_total"]]
    assert a_total["period_start"] == "0001-01-01T00:00:00Z"
    assert a_total["spend"]["cost_micros"] == 2770
    assert a_total["crossed"] == [{"measure": "cost_micros", "threshold": 50}]
    assert [c["threshold"] for c in by_id[tenants.budgets["b_total"]]["crossed"]] == [50, 80, 100]
    # Never judged: over its limit, yet nothing crossed, in both answers.
    unjudged = by_id[tenants.budgets["alice_unjudged"]]
    assert unjudged["spend"]["total_tokens"] > unjudged["limits"]["total_tokens"]
    assert unjudged["crossed"] == []


def test_each_budget_by_id_answers_as_its_row_of_budget_list(tenants: Tenants) -> None:  # noqa: F811
    for row in cli_budgets(tenants.ledger_url):
        answer = tenants.get(tenants.admin, f"/v1/budgets/{row['id']}")
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected(row)
    gone = tenants.get(tenants.admin, f"/v1/budgets/{max(tenants.budgets.values()) + 1}")
    assert (gone.status_code, gone.json()) == (404, {"detail": "not found"})


def test_each_key_lists_the_budgets_of_its_scope(tenants: Tenants) -> None:  # noqa: F811
    of_a = [expected(row) for row in cli_budgets(tenants.ledger_url, "--space", str(SPACE_A))]
    assert every(tenants, tenants.space_a) == of_a
    assert every(tenants, tenants.space_a, space_id=SPACE_A) == of_a
    # A user's key: its own user's budgets alone, never Bob's, nor the space-wide ones (whose
    # spend, beside its own usage, would tell the other users' apart).
    alices = [row for row in of_a if row["user_id"] == str(ALICE)]
    assert alices
    assert every(tenants, tenants.alice) == alices
    assert tenants.budgets["bob_total"] not in {row["id"] for row in alices}
    for row in of_a:
        if row["user_id"] is None:
            assert tenants.get(tenants.alice, f"/v1/budgets/{row['id']}").status_code == 404
    for row in alices:
        assert tenants.get(tenants.alice, f"/v1/budgets/{row['id']}").json() == row


def test_pages_follow_their_cursor_by_id(tenants: Tenants) -> None:  # noqa: F811
    whole = tenants.get(tenants.admin, "/v1/budgets").json()
    assert whole["next_cursor"] is None and len(whole["rows"]) == len(tenants.budgets)
    first = tenants.get(tenants.admin, "/v1/budgets", limit=3).json()
    assert first["rows"] == whole["rows"][:3] and isinstance(first["next_cursor"], str)
    second = tenants.get(tenants.admin, "/v1/budgets", limit=3, cursor=first["next_cursor"])
    assert second.json()["rows"] == whole["rows"][3:6]
    assert every(tenants, tenants.admin, limit=1) == whole["rows"]
    # A page that ends on the last budget says so.
    assert (
        tenants.get(tenants.admin, "/v1/budgets", limit=len(tenants.budgets)).json()["next_cursor"]
        is None
    )


def _usage_cursor(tenants: Tenants) -> str:  # noqa: F811
    page = tenants.get(tenants.admin, group_by="model", limit=1).json()
    return str(page["next_cursor"])


@pytest.mark.parametrize(
    ("path", "params", "loc"),
    [
        ("/v1/budgets", {"limit": 0}, ["query", "limit"]),
        ("/v1/budgets", {"limit": 1001}, ["query", "limit"]),
        ("/v1/budgets", {"limit": "ten"}, ["query", "limit"]),
        ("/v1/budgets", {"space_id": 0}, ["query", "space_id"]),
        ("/v1/budgets", {"space_id": "seven"}, ["query", "space_id"]),
        ("/v1/budgets", {"cursor": "!"}, ["query", "cursor"]),
        ("/v1/budgets", {"cursor": "e30"}, ["query", "cursor"]),  # {}
        ("/v1/budgets", {"cursor": "eyJidWRnZXQiOnRydWV9"}, ["query", "cursor"]),  # true
        ("/v1/budgets", {"cursor": "eyJidWRnZXQiOjB9"}, ["query", "cursor"]),  # 0
        ("/v1/budgets", {"cursor": "usage"}, ["query", "cursor"]),  # a usage page's
        ("/v1/budgets/seven", {}, ["path", "id"]),
        ("/v1/budgets/1.5", {}, ["path", "id"]),
        ("/v1/budgets/0", {}, ["path", "id"]),
        (f"/v1/budgets/{2**63}", {}, ["path", "id"]),
    ],
)
def test_bad_parameters_get_422_naming_them(
    tenants: Tenants,  # noqa: F811
    path: str,
    params: dict[str, Any],
    loc: list[str],
) -> None:
    if params.get("cursor") == "usage":
        params = {"cursor": _usage_cursor(tenants)}
    answer = tenants.get(tenants.admin, path, **params)
    assert answer.status_code == 422, answer.text
    assert [e["loc"][:2] for e in answer.json()["detail"]] == [loc]


def test_metrics_name_the_route_template_never_the_id(tenants: Tenants) -> None:  # noqa: F811
    budget_id = tenants.budgets["a_total"]
    assert tenants.get(tenants.admin, f"/v1/budgets/{budget_id}").status_code == 200
    assert tenants.get(tenants.admin, "/v1/budgets").status_code == 200
    text = httpx.get(f"{tenants.server.url}/metrics").text
    assert 'token_ledger_api_requests_total{route="/v1/budgets/{id}",status="200"}' in text
    assert 'token_ledger_api_requests_total{route="/v1/budgets",status="200"}' in text
    assert f"/v1/budgets/{budget_id}" not in text
