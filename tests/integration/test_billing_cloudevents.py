"""The billing stream read as a CloudEvents receiver reads it: through the CloudEvents SDK's Kafka
protocol binding, over real Kafka (docs/contract.md#record). The records are structured-mode
events (`content-type: application/cloudevents+json`, no `ce_` header), and the SDK's events are
the JSON values: same id, type, source, subject, time and data."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka_event

from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from tests.factories import START
from tests.integration.harness import Stack
from tests.integration.test_billing import checked, consume_until_idle

STRUCTURED = b"application/cloudevents+json"


def read_with_the_sdk(record: Any) -> dict[str, Any]:
    """The record through the SDK's binding, as the attributes our JSON value carries."""
    headers: dict[str, bytes] = dict(record.headers or ())
    event = from_kafka_event(KafkaMessage(headers, record.key, record.value))
    time = event.get_time()
    assert isinstance(time, datetime)
    return {
        "specversion": event.get_specversion(),
        "id": event.get_id(),
        "type": event.get_type(),
        "source": event.get_source(),
        "subject": event.get_subject(),
        "time": time,
        "datacontenttype": event.get_datacontenttype(),
        "data": event.get_data(),
        "partitionkey": event.get_extension("partitionkey"),
    }


def as_sent(record: Any) -> dict[str, Any]:
    """The same attributes, from the JSON value itself (and the key the binding maps)."""
    event = checked(record)
    return {
        **event,
        "time": datetime.fromisoformat(event["time"]),
        "partitionkey": record.key.decode(),
    }


async def test_the_sdk_kafka_binding_reads_every_billing_record_as_the_event_sent(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    records, _ = plan_traffic(
        TrafficConfig(
            threads=12, turns_per_thread=3, seed=41, poison_rate=0, legacy_rate=0.5, start=START
        )
    )
    for part in (records[: len(records) // 2], records[len(records) // 2 :]):
        await stack.publish(part)  # two drains: later finalizes supersede (reversals too)
        consume_until_idle(stack)

    published = await stack.billing_records()
    assert len(published) > 12
    assert any(json.loads(r.value)["data"]["reverses"] is not None for r in published)
    for record in published:
        headers = list(record.headers or ())
        # The binding's structured mode: this header, and no `ce_` header (binary mode).
        assert headers == [("content-type", STRUCTURED)], headers
        assert read_with_the_sdk(record) == as_sent(record)
