"""`token-ledger consume`: build every resource, run the pipeline, release everything.

Resources are async context managers composed with an AsyncExitStack, released in reverse
order: the HTTP server, then the consumer (leaving the group), the dead-letter producer, and
the database pool last. SIGTERM/SIGINT only request a stop: the batch in flight commits first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack

from aiokafka import AIOKafkaConsumer

from consumer.dlq import HEADER_HEADROOM, DeadLetterQueue
from consumer.health import HealthServer, Readiness
from consumer.logs import fields
from consumer.metrics import LedgerMetrics
from consumer.pipeline import Pipeline
from consumer.settings import Settings
from consumer.store import create_pool, ping
from consumer.topics import prepare_topics

log = logging.getLogger(__name__)


def source_consumer(
    settings: Settings, fetch_bytes: int, *, group_id: str | None = None
) -> AIOKafkaConsumer:
    """The pipeline's consumer of the source topic (group_id: the settings' unless given).

    read_committed: a chat service publishing in Kafka transactions may abort one, and an
    aborted turn must never be billed; records of an open transaction wait for its commit."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id or settings.group_id,
        client_id="token-ledger",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=fetch_bytes,
        fetch_max_bytes=max(50 * 1024 * 1024, fetch_bytes),
        **settings.kafka_security(),
    )


async def consume(settings: Settings, *, until_idle: bool = False) -> None:
    limits = await prepare_topics(settings)
    security = settings.kafka_security()
    metrics = LedgerMetrics()
    readiness = Readiness(stall_seconds=settings.stall_seconds)
    fetch_bytes = limits.source_max_bytes + HEADER_HEADROOM
    async with AsyncExitStack() as stack:
        pool = await create_pool(settings.database_url.get_secret_value())
        stack.push_async_callback(pool.close)
        dlq = await stack.enter_async_context(
            DeadLetterQueue(
                settings.kafka_bootstrap,
                settings.dlq_topic,
                max_record_bytes=limits.source_max_bytes,
                **security,
            )
        )
        consumer = source_consumer(settings, fetch_bytes)
        pipeline = Pipeline(settings, consumer, pool, dlq, metrics, readiness)
        consumer.subscribe([settings.topic], listener=pipeline.listener)
        await consumer.start()
        stack.push_async_callback(consumer.stop)  # leaves the group
        stack.push_async_callback(pipeline.stop)  # runs first: waits for the batch in flight

        async def database_answers() -> bool:
            return await ping(pool)

        health = HealthServer(
            settings.metrics_host, settings.metrics_port, metrics, readiness, database_answers
        )
        await health.start()
        stack.push_async_callback(health.stop)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pipeline.request_stop)
        stack.callback(
            lambda: [loop.remove_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT)]
        )
        log.info(
            "consuming",
            extra=fields(
                topic=settings.topic,
                group=settings.group_id,
                dlq=settings.dlq_topic,
                max_batch=settings.max_batch,
                metrics_host=health.host,
                metrics_port=health.port,
            ),
        )
        await pipeline.run(until_idle=until_idle)
    log.info("stopped")
