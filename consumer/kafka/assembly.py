"""One way to assemble and open the Kafka loop, used by `consume` (consumer/service.py) and by
every in-process test: the dead-letter producer, the source consumer subscribed with the
pipeline's rebalance listener and started; on exit the batch in flight is finished or
abandoned, the group left and the producer closed, in that order, each within a bound.

Tests swap the batch transaction (`commit`) and the backoff; the pipeline's parts are built by
`build_pipeline` (also what the unit tests drive with fakes).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from consumer.http.metrics import CountRetries, LedgerMetrics
from consumer.kafka.checkpoint import Checkpoints
from consumer.kafka.closing import bounded, stop_consumer
from consumer.kafka.dead_letters import DeadLetterQueue
from consumer.kafka.outages import KafkaLogFilter
from consumer.kafka.pausing import PauseWhileRetrying
from consumer.kafka.pipeline import Commit, Pipeline, Recognise, recognise_nothing
from consumer.ledger.applied import recognise as recognise_applied
from consumer.ledger.batch import commit_batch
from consumer.retry import Backoff, Retrier, RetryObserver
from consumer.settings import Settings
from consumer.status import Readiness, RetryStatus

BATCH_BACKOFF = Backoff(initial=0.1, maximum=5.0)
RELEASE_SECONDS = 1.0  # each resource gets this long to close


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
        # Never reset silently: a stored offset outside the log is the pipeline's to judge
        # (LEDGER_OFFSET_RESET); every assigned partition is sought explicitly anyway.
        auto_offset_reset="none",
        isolation_level="read_committed",
        session_timeout_ms=round(settings.session_timeout * 1000),
        heartbeat_interval_ms=round(settings.heartbeat_interval * 1000),
        # A JoinGroup may wait for the whole rebalance (as long as the session timeout): the
        # client must not give up on it first (aiokafka's default is 40 s).
        request_timeout_ms=max(40_000, round(settings.session_timeout * 1000) + 5_000),
        max_partition_fetch_bytes=fetch_bytes,
        fetch_max_bytes=max(50 * 1024 * 1024, fetch_bytes),
        **settings.kafka_security(),
    )


@asynccontextmanager
async def open_pipeline(
    settings: Settings,
    pool: asyncpg.Pool,
    metrics: LedgerMetrics,
    readiness: Readiness,
    *,
    fetch_bytes: int,
    group_id: str | None = None,
    backoff: Backoff = BATCH_BACKOFF,
    commit: Commit | None = None,
) -> AsyncIterator[Pipeline]:
    """The pipeline, subscribed and started, ready to `run()`; see the module docstring.
    `fetch_bytes`: per partition and fetch, at least the largest record the topic accepts."""
    async with AsyncExitStack() as stack:
        dlq = await DeadLetterQueue(
            settings.kafka_bootstrap,
            settings.dlq_topic,
            group_id=settings.group_id,  # the group whose offsets the batch moves
            **settings.kafka_security(),
        ).__aenter__()
        stack.push_async_callback(bounded(dlq.close, "dead-letter producer", RELEASE_SECONDS))
        consumer = source_consumer(settings, fetch_bytes, group_id=group_id)
        pipeline = build_pipeline(
            settings, consumer, pool, dlq, metrics, readiness, backoff=backoff, commit=commit
        )
        consumer.subscribe([settings.topic], listener=_Rebalance(pipeline))
        # aiokafka's reconnect complaints, from joining the group to leaving it, become the
        # broker's outage. On the root logger's handlers: aiokafka logs on child loggers too.
        kafka_logs = KafkaLogFilter(pipeline.kafka)
        for handler in logging.getLogger().handlers:
            handler.addFilter(kafka_logs)
            stack.callback(handler.removeFilter, kafka_logs)
        # Also when start() fails: its half-made connections would be reported unclosed.
        close_consumer = functools.partial(stop_consumer, consumer)
        stack.push_async_callback(bounded(close_consumer, "Kafka consumer", RELEASE_SECONDS))
        await consumer.start()
        stack.push_async_callback(pipeline.stop)  # runs first: waits for the batch in flight
        yield pipeline


def build_pipeline(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    pool: asyncpg.Pool,
    dlq: DeadLetterQueue,
    metrics: LedgerMetrics,
    readiness: Readiness,
    *,
    backoff: Backoff = BATCH_BACKOFF,
    commit: Commit | None = None,
) -> Pipeline:
    """The pipeline as `consume` runs it; tests may swap the batch transaction (`commit`)."""
    pipeline: Pipeline | None = None
    checkpoints: Checkpoints | None = None

    def abandon() -> bool:  # the partitions are being given up, or the consumer stops
        return pipeline is not None and (pipeline.revoking or pipeline._stop.is_set())

    def held() -> set[int]:
        return checkpoints.opening if checkpoints is not None else set()

    status = RetryStatus(readiness)
    observers: list[RetryObserver] = [
        status,
        CountRetries(metrics),
        PauseWhileRetrying(consumer, readiness, held),
    ]
    retry = Retrier(backoff, abandon=abandon, observers=observers)
    checkpoints = Checkpoints(settings, consumer, pool, metrics, readiness, retry)
    recognise: Recognise = recognise_nothing  # a swapped transaction stores no fingerprints
    if commit is None:
        commit = functools.partial(commit_batch, pool, settings.group_id, settings.topic)
        recognise = functools.partial(recognise_applied, pool, settings.group_id, settings.topic)
    pipeline = Pipeline(
        settings, consumer, dlq, metrics, readiness, checkpoints, retry, status, commit, recognise
    )
    return pipeline


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's rebalance callbacks, as the pipeline's SinkTask verbs."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.pipeline.close(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.pipeline.open(assigned)
