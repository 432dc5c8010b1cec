"""Generate the published contract from the models: JSON Schemas and the AsyncAPI document.

    python -m producer.contract          # rewrite producer/schema/*.json
    python -m producer.contract --check  # exit 1 if the committed files are stale

Teams that do not use Python code against these files; a test keeps them in sync.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from producer.billing import BillingEvent
from producer.budget_alerts import BudgetAlertEvent
from producer.client import DEFAULT_TOPIC
from producer.events import EVENT_TYPES, LegacyAppendV0, RejectReason

SCHEMA_DIR = Path(__file__).parent / "schema"
DLQ_TOPIC = f"{DEFAULT_TOPIC}.dlq"
BILLING_TOPIC = "billing.token-usage"
BILLING_SCHEMA = f"{BILLING_TOPIC}.v1.json"
BUDGET_TOPIC = "billing.budget-alerts"
BUDGET_SCHEMA = f"{BUDGET_TOPIC}.v1.json"
CLOUDEVENTS_HEADERS = {
    "type": "object",
    "required": ["content-type"],
    "properties": {"content-type": {"const": "application/cloudevents+json"}},
}


def _schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:token-ledger:schema:{name}",
        **schema,
    }


def _event_name(model: type[BaseModel]) -> str:
    return str(model.model_fields["type"].annotation.__args__[0])  # type: ignore[union-attr]


def _asyncapi(schema_files: list[str]) -> dict[str, Any]:
    messages = {
        name.removesuffix(".json").replace(".", "_"): {
            "name": name.removesuffix(".json"),
            "contentType": "application/json",
            "payload": {"$ref": f"./{name}"},
        }
        for name in schema_files
        if name not in (BILLING_SCHEMA, BUDGET_SCHEMA)
    }
    header = {"type": "string"}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "token-ledger chat turn events",
            "version": "1.0.0",
            "description": (
                "Chat services publish turn events; token-ledger keeps the ledger. Key: "
                "thread_id as decimal UTF-8. Delivery is at-least-once: an exact copy (same "
                "event_id, occurred_at and payload) is a duplicate, so a retry re-sends the "
                "original event unchanged. Forward compatible: fields a consumer does not know "
                "are accepted (kept inside content parts, usage calls and legacy per-model "
                "breakdowns, ignored elsewhere); breaking changes come with a new "
                "schema_version. Numbers inside content are stored exactly as sent; NaN and "
                "Infinity are not JSON."
            ),
        },
        "channels": {
            "turnEvents": {
                "address": DEFAULT_TOPIC,
                "messages": {key: {"$ref": f"#/components/messages/{key}"} for key in messages},
            },
            "billingUsage": {
                "address": BILLING_TOPIC,
                "description": "One record per revision of a message's authoritative usage "
                "(CloudEvents 1.0, structured JSON). At-least-once: a duplicate is the identical "
                "record; dedupe by id. Key: thread_id as decimal UTF-8.",
                "messages": {"usageRevision": {"$ref": "#/components/messages/usageRevision"}},
            },
            "budgetAlerts": {
                "address": BUDGET_TOPIC,
                "description": "One record per change of a budget threshold's state: crossed"
                " when the committed spend of a (budget, period) reaches it, withdrawn when a"
                " correction takes it back under (CloudEvents 1.0, structured JSON). At-least-once:"
                " a duplicate is the identical record; dedupe by id. Key: search_space_id as"
                " decimal UTF-8.",
                "messages": {"budgetAlert": {"$ref": "#/components/messages/budgetAlert"}},
            },
            "deadLetters": {
                "address": DLQ_TOPIC,
                "description": "Records the ledger could not apply: original key and value, "
                "byte for byte, with the reason in headers.",
                "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
            },
        },
        "operations": {
            "publishTurnEvents": {"action": "send", "channel": {"$ref": "#/channels/turnEvents"}},
            "consumeTurnEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/turnEvents"},
            },
            "publishUsageRevisions": {
                "action": "send",
                "channel": {"$ref": "#/channels/billingUsage"},
            },
            "publishBudgetAlerts": {
                "action": "send",
                "channel": {"$ref": "#/channels/budgetAlerts"},
            },
            "publishDeadLetters": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
            },
        },
        "components": {
            "messages": {
                **messages,
                "usageRevision": {
                    "name": "usageRevision",
                    "contentType": "application/cloudevents+json",
                    # The CloudEvents Kafka binding's structured mode says so in this header.
                    "headers": CLOUDEVENTS_HEADERS,
                    "payload": {"$ref": f"./{BILLING_SCHEMA}"},
                },
                "budgetAlert": {
                    "name": "budgetAlert",
                    "contentType": "application/cloudevents+json",
                    "headers": CLOUDEVENTS_HEADERS,
                    "payload": {"$ref": f"./{BUDGET_SCHEMA}"},
                },
                "deadLetter": {
                    "name": "deadLetter",
                    "contentType": "application/octet-stream",
                    "headers": {
                        "type": "object",
                        "properties": {
                            "ledger.error.reason": {
                                "type": "string",
                                "enum": [reason.value for reason in RejectReason],
                            },
                            "ledger.error.detail": {**header, "maxLength": 1024},
                            "ledger.source.topic": header,
                            "ledger.source.partition": {**header, "pattern": "^[0-9]+$"},
                            "ledger.source.offset": {**header, "pattern": "^[0-9]+$"},
                            "ledger.failed_at": {**header, "format": "date-time"},
                        },
                    },
                    "payload": {"description": "the original record value, unchanged"},
                },
            }
        },
    }


def render() -> dict[str, str]:
    """File name -> content of every generated contract file."""
    files: dict[str, str] = {}
    for model in EVENT_TYPES:
        name = f"{_event_name(model)}.v1.json"
        files[name] = json.dumps(_schema(model, name.removesuffix(".json")), indent=2) + "\n"
    legacy = "message.appended.v0.json"
    files[legacy] = json.dumps(_schema(LegacyAppendV0, "message.appended.v0"), indent=2) + "\n"
    files[BILLING_SCHEMA] = (
        json.dumps(_schema(BillingEvent, BILLING_SCHEMA.removesuffix(".json")), indent=2) + "\n"
    )
    files[BUDGET_SCHEMA] = (
        json.dumps(_schema(BudgetAlertEvent, BUDGET_SCHEMA.removesuffix(".json")), indent=2) + "\n"
    )
    files["asyncapi.json"] = json.dumps(_asyncapi(sorted(files)), indent=2) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed files differ")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = SCHEMA_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            SCHEMA_DIR.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale contract files (run python -m producer.contract): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
