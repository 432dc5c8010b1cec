"""`token-ledger consume`: build every resource, run the pipeline, release everything.

Resources are async context managers composed with an AsyncExitStack, released in reverse
order: the consumer (leaving the group), the dead-letter producer, the HTTP server, and the
database pool last, each for a bounded time.

Start: topics, the pool, one look at the database (schema.check_database: login, schema
revision, privileges; a definite refusal stops the command with its one line), the HTTP server,
then, if the database did not answer, a wait for it (not ready meanwhile), and only then the
group.

SIGTERM/SIGINT, at any moment from the first line on (docs/operations.md#stopping): while starting, the
start is abandoned; while running, the batch in flight may finish; either way the process
exits 0 within STOP_GRACE_SECONDS + the bounded releases (< 10 s), even with the broker or the
database hung.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka.errors import UnknownTopicOrPartitionError

from consumer import collector
from consumer.billing.relay import BILLING_PARTITIONS, BillingProducer, Relay
from consumer.failures import TopicMissingError
from consumer.http.health import HealthServer
from consumer.http.metrics import LedgerMetrics
from consumer.kafka.assembly import RELEASE_SECONDS, open_pipeline
from consumer.kafka.closing import bounded
from consumer.kafka.dead_letters import HEADER_HEADROOM
from consumer.kafka.log_start import LogStartWatch
from consumer.kafka.pipeline import Pipeline
from consumer.kafka.topics import MAX_MESSAGE_BYTES, ensure_or_create, prepare_topics
from consumer.ledger.database import create_pool, ping
from consumer.ledger.offsets import last_commit_time
from consumer.ledger.schema import check_database, read_when_usable, wait_until_usable
from consumer.logs import fields
from consumer.settings import Settings
from consumer.status import Readiness

log = logging.getLogger(__name__)


STOP_GRACE_SECONDS = 5.0  # after a stop request, the batch in flight gets this long
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _bounded(close: Callable[[], Awaitable[Any]], what: str) -> Callable[[], Awaitable[None]]:
    return bounded(close, what, RELEASE_SECONDS)


@dataclass(frozen=True)
class Unfinished:
    """What `consume --until-idle` could not finish, which it reports as a failure."""

    partitions: dict[int, str] = field(default_factory=dict)  # stopped: partition -> why
    billing: dict[str, str] = field(default_factory=dict)  # refused: revision id -> why

    def __bool__(self) -> bool:
        return bool(self.partitions or self.billing)


async def consume(settings: Settings, *, until_idle: bool = False) -> Unfinished:
    """Run until stopped, or with until_idle until caught up (and billed); returns what could
    not be finished on its own."""
    collector.tune()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    pipeline: Pipeline | None = None
    stopping = False
    relay_stop = asyncio.Event()

    def on_signal() -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        relay_stop.set()
        if pipeline is None:
            log.info("stop requested while starting")
            main.cancel()
            return
        pipeline.request_stop()
        loop.call_later(STOP_GRACE_SECONDS, main.cancel)  # a batch hung on the database

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        async with AsyncExitStack() as stack:
            # First, so that it also sweeps while the start waits for a database that is down.
            sweeping = asyncio.create_task(collector.sweep())
            stack.push_async_callback(_cancel, sweeping, "the garbage collector's sweep")
            pipeline, relay = await _start(settings, stack, until_idle)
            if relay is not None:
                relaying = asyncio.create_task(relay.run(relay_stop))
                stack.push_async_callback(_finish, relaying, relay_stop)
            if not stopping:
                await pipeline.run(until_idle=until_idle)
            if until_idle and relay is not None and not stopping:
                # Caught up means billed too: every revision the drain wrote is on its topic.
                await relay.run(relay_stop, until_empty=True)
            # A stop that was asked for is a clean exit (SIGTERM -> 0), halted partitions or not.
            unfinished = (
                Unfinished()
                if stopping
                else Unfinished(
                    dict(pipeline.readiness.halted),
                    {} if relay is None else relay.held(),
                )
            )
    except asyncio.CancelledError:
        if not stopping:
            raise
        unfinished = Unfinished()
    finally:
        # remove_signal_handler leaves SIG_DFL behind: blocked meanwhile, a SIGTERM arriving
        # now waits for the previous handler instead of killing the process.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # Not when it failed: then the command's one line (consumer/failures.py) says why.
    log.info("stopped")
    return unfinished


async def _finish(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    try:
        async with asyncio.timeout(RELEASE_SECONDS):
            await task
    except TimeoutError:
        log.warning("gave up waiting for the billing relay")


async def _cancel(task: asyncio.Task[None], what: str) -> None:
    """Cancel a background task that holds nothing worth finishing; wait for it, bounded (a
    statement on a database that does not answer is the pool's to release)."""
    task.cancel()
    _, running = await asyncio.wait({task}, timeout=RELEASE_SECONDS)
    if running:
        log.info(f"{what} did not end within {RELEASE_SECONDS:g} s: left to the pool's release")


async def start_relay(
    settings: Settings,
    stack: AsyncExitStack,
    pool: asyncpg.Pool,
    metrics: LedgerMetrics,
    record_bytes: int,
    readiness: Readiness | None = None,
) -> Relay:
    """The billing relay and its producer. The topic is ensured by the relay's first pass, not
    here: billing that cannot reach its topic must not keep the ledger from starting."""
    security = settings.kafka_security()

    missing_said: set[str] = set()

    def ensure(
        topic: str, variable: str, config: dict[str, str] | None = None
    ) -> Callable[[], Awaitable[None]]:
        async def ensured() -> None:
            try:
                await ensure_or_create(
                    settings, topic, variable, partitions=BILLING_PARTITIONS, config=config
                )
            except TopicMissingError as missing:
                # The relay's outage, retried (its outage lines name only the error's type),
                # not the ledger's stop: which topic and variable is said once.
                if variable not in missing_said:
                    missing_said.add(variable)
                    log.warning(str(missing))
                raise UnknownTopicOrPartitionError(str(missing)) from None

        return ensured

    producer = await BillingProducer(
        settings.kafka_bootstrap, settings.billing_topic, settings.budget_topic, **security
    ).__aenter__()
    stack.push_async_callback(_bounded(producer.close, "billing producer"))
    return Relay(
        pool,
        producer,
        metrics,
        retention=settings.outbox_retention,
        batch=settings.relay_batch,
        # A revision of the largest event must fit.
        prepare=ensure(
            settings.billing_topic,
            "LEDGER_BILLING_TOPIC",
            config={MAX_MESSAGE_BYTES: str(record_bytes)},
        ),
        prepare_alerts=ensure(settings.budget_topic, "LEDGER_BUDGET_TOPIC"),
        readiness=readiness,
    )


async def _start(
    settings: Settings, stack: AsyncExitStack, until_idle: bool
) -> tuple[Pipeline, Relay | None]:
    limits = await prepare_topics(settings)
    metrics = LedgerMetrics()
    readiness = Readiness(stall_seconds=settings.stall_seconds)
    fetch_bytes = limits.source_max_bytes + HEADER_HEADROOM
    pool = await create_pool(settings.database_url.get_secret_value())
    stack.push_async_callback(_bounded(pool.close, "database pool"))
    stack.callback(pool.terminate)  # whatever the bounded close left open
    # Before joining the group: a refused login or a wrong schema met later, inside aiokafka's
    # rebalance listener, would only be logged there and swallowed. A refusal stops us here.
    unreachable = await check_database(pool, settings)

    async def database_answers() -> bool:
        return await ping(pool)

    health = HealthServer(
        settings.metrics_host, settings.metrics_port, metrics, readiness, database_answers
    )
    await health.start()
    stack.push_async_callback(_bounded(health.stop, "HTTP server"))
    if unreachable is not None:  # waited for like any outage: alive, not ready
        await wait_until_usable(pool, settings, readiness, unreachable)
    relay = (
        await start_relay(settings, stack, pool, metrics, fetch_bytes, readiness)
        if settings.relay
        else None
    )
    # The gauge tells when the ledger last moved, not when this process started.
    last = await read_when_usable(
        pool, settings, readiness, lambda: last_commit_time(pool, settings.group_id, settings.topic)
    )
    if last is not None:
        metrics.last_commit.set(last)
    pipeline = await stack.enter_async_context(
        open_pipeline(settings, pool, metrics, readiness, fetch_bytes=fetch_bytes)
    )
    health.refresh = pipeline.lag.update  # lag counted every second, even with a batch blocked
    forgetting = asyncio.create_task(
        LogStartWatch(pipeline.consumer, pool, settings.group_id, settings.topic).run()
    )
    stack.push_async_callback(_cancel, forgetting, "the log start watch")
    log.info(
        "consuming",
        extra=fields(
            topic=settings.topic,
            group=settings.group_id,
            dlq=settings.dlq_topic,
            max_batch=settings.max_batch,
            max_batch_bytes=settings.max_batch_bytes,
            metrics_host=health.host,
            metrics_port=health.port,
            until_idle=until_idle,
            billing_relay=settings.relay,
        ),
    )
    return pipeline, relay


async def relay(settings: Settings) -> None:
    """`token-ledger relay`: the billing relay alone, until SIGTERM/SIGINT (exit 0 within 10 s,
    even with Kafka or the database hung). It serves /metrics, /healthz and /readyz on
    LEDGER_RELAY_METRICS_PORT: its backlog (token_ledger_outbox_pending) and what it
    holds back (token_ledger_billing_refused, and /readyz names each revision)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stop = asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            loop.call_later(STOP_GRACE_SECONDS, main.cancel)  # a pass hung on Kafka or the database

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        async with AsyncExitStack() as stack:
            pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
            stack.push_async_callback(_bounded(pool.close, "database pool"))
            stack.callback(pool.terminate)
            await check_database(pool, settings)
            limits = await prepare_topics(settings)
            metrics = LedgerMetrics()
            readiness = Readiness(stall_seconds=settings.stall_seconds, consumes=False)

            async def database_answers() -> bool:
                return await ping(pool)

            health = HealthServer(
                settings.metrics_host,
                settings.relay_metrics_port,
                metrics,
                readiness,
                database_answers,
                variable="LEDGER_RELAY_METRICS_PORT",
            )
            await health.start()
            stack.push_async_callback(_bounded(health.stop, "HTTP server"))
            billing = await start_relay(
                settings, stack, pool, metrics, limits.source_max_bytes + HEADER_HEADROOM, readiness
            )
            log.info("relaying", extra=fields(topic=settings.billing_topic))
            await billing.run(stop)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    log.info("stopped")
