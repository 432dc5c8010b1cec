"""The consumer's topics: created when missing (unless LEDGER_CREATE_TOPICS=false, where a
missing one stops the command, exit 8), each creation logged, and sized so that any record the
source topic accepts also fits, byte for byte, into the dead-letter topic and through our
clients."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import UnknownTopicOrPartitionError, for_code

from consumer.errors import TopicConfigError
from consumer.failures import TopicMissingError
from consumer.kafka.dead_letters import HEADER_HEADROOM
from consumer.logs import fields
from consumer.settings import PREFIX, Settings
from producer.client import ensure_topic

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = "max.message.bytes"


@dataclass(frozen=True)
class TopicLimits:
    source_max_bytes: int  # the largest record the source topic accepts


async def _max_message_bytes(admin: AIOKafkaAdminClient, topic: str) -> int:
    # A topic created a moment ago may not be describable yet on every broker: ask again,
    # briefly, the way Kafka's own admin tools wait for metadata to propagate.
    for attempt in range(50):
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        for response in responses:
            for resource in response.to_object()["resources"]:
                if resource["error_code"] == UnknownTopicOrPartitionError.errno:
                    continue  # not propagated yet
                if resource["error_code"] != 0:  # e.g. not authorised: asking again won't help
                    raise for_code(resource["error_code"])(f"describing topic {topic}")
                for entry in resource["config_entries"]:
                    if entry["config_names"] == MAX_MESSAGE_BYTES:
                        return int(entry["config_value"])
        await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
    raise TopicConfigError(f"topic {topic} reports no {MAX_MESSAGE_BYTES}")


async def ensure_or_create(
    settings: Settings,
    topic: str,
    variable: str,
    *,
    partitions: int,
    config: dict[str, str] | None = None,
) -> None:
    """The topic exists afterwards: created if missing and LEDGER_CREATE_TOPICS allows (logged:
    a mistyped name must not pass unnoticed), else TopicMissingError naming the variable."""
    try:
        created = await ensure_topic(
            settings.kafka_bootstrap,
            topic,
            partitions=partitions,
            config=config,
            create=settings.create_topics,
            **settings.kafka_security(),
        )
    except UnknownTopicOrPartitionError:
        raise TopicMissingError(
            f"topic {topic} does not exist at {settings.kafka_bootstrap} and"
            f" {PREFIX}CREATE_TOPICS=false: check {variable}, or create the topic"
        ) from None
    if created:
        options: dict[str, Any] = {"partitions": partitions, **(config or {})}
        log.warning(
            f"topic {topic} did not exist: created it (set {PREFIX}CREATE_TOPICS=false to"
            " refuse a missing topic instead)",
            extra=fields(topic=topic, variable=variable, **options),
        )


async def prepare_topics(settings: Settings, *, partitions: int = 3) -> TopicLimits:
    security = settings.kafka_security()
    await ensure_or_create(settings, settings.topic, f"{PREFIX}TOPIC", partitions=partitions)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **security)
    await admin.start()
    try:
        source_max = await _max_message_bytes(admin, settings.topic)
        needed = source_max + HEADER_HEADROOM
        await ensure_or_create(
            settings,
            settings.dlq_topic,
            f"{PREFIX}DLQ_TOPIC",
            partitions=1,
            config={MAX_MESSAGE_BYTES: str(needed)},
        )
        dlq_max = await _max_message_bytes(admin, settings.dlq_topic)
    finally:
        await admin.close()
    if dlq_max < needed:
        raise TopicConfigError(
            f"dead-letter topic {settings.dlq_topic} accepts {dlq_max} bytes, but records of "
            f"{settings.topic} can be {source_max} bytes: set its {MAX_MESSAGE_BYTES} to at "
            f"least {needed}"
        )
    return TopicLimits(source_max_bytes=source_max)
