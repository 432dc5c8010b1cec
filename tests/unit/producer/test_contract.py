"""The committed JSON Schemas and AsyncAPI document are what the models generate, and the
examples validate against them with an independent JSON Schema validator."""

from __future__ import annotations

import json

import jsonschema
import pytest

from producer import contract
from tests.examples import EXAMPLE_NAMES, example

SCHEMA_OF = {
    "turn.started": "turn.started.v1.json",
    "turn.finalized": "turn.finalized.v1.json",
    "message.appended": "message.appended.v1.json",
    "message.appended.v0": "message.appended.v0.json",
}


def test_regenerating_the_contract_yields_no_diff() -> None:
    rendered = contract.render()
    committed = {path.name: path.read_text() for path in contract.SCHEMA_DIR.glob("*.json")}
    assert committed == rendered


def _validator(schema_file: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((contract.SCHEMA_DIR / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_example_validates_against_its_schema(name: str) -> None:
    errors = list(_validator(SCHEMA_OF[name]).iter_errors(example(name)))
    assert errors == []


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("turn.started", {"thread_id": 0}),
        ("turn.started", {"turn_id": "x" * 65}),
        ("turn.finalized", {"content": [{"text": "no type"}]}),
        ("message.appended", {"role": "robot"}),
        ("message.appended.v0", {"schema_version": 1}),
    ],
)
def test_schemas_reject_what_the_models_reject(name: str, change: dict[str, object]) -> None:
    assert list(_validator(SCHEMA_OF[name]).iter_errors({**example(name), **change}))


def test_asyncapi_describes_every_topic_and_references_every_schema() -> None:
    document = json.loads((contract.SCHEMA_DIR / "asyncapi.json").read_text())
    assert document["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {
        "chat.turn-events",
        "chat.turn-events.dlq",
        "billing.token-usage",
        "billing.budget-alerts",
    }
    refs = {
        message["payload"]["$ref"].removeprefix("./")
        for message in document["components"]["messages"].values()
        if "$ref" in message.get("payload", {})
    }
    assert refs == {*SCHEMA_OF.values(), contract.BILLING_SCHEMA, contract.BUDGET_SCHEMA}
    for ref in refs:
        assert (contract.SCHEMA_DIR / ref).exists()
    headers = document["components"]["messages"]["deadLetter"]["headers"]["properties"]
    assert {
        "ledger.error.reason",
        "ledger.error.detail",
        "ledger.source.topic",
        "ledger.source.partition",
        "ledger.source.offset",
        "ledger.failed_at",
    } == set(headers)
