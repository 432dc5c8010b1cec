"""The outbox relay: pending usage revisions from `billing_outbox` to the billing topic.

One pass (`publish_pending`), in one transaction:
  1. take the relay lock (a transaction-scoped advisory lock: of several consumers, one relays
     at a time, so revisions of one message are never published out of order);
  2. read up to `batch` pending rows in id order (a message's revision n+1 is written only
     after the transaction of revision n committed, so id order is revision order);
  3. send them (idempotent producer, acks=all, key = thread_id: one thread, one partition)
     and wait for every acknowledgement;
  4. mark them published; COMMIT.
Killed between 3 and 4, the next pass publishes the same rows again: at-least-once, and a
duplicate is the identical record (consumer/billing.py). Published rows older than the
retention are pruned now and then; the usage rows stay the source of truth.

Nothing the broker or the database answers stops the relay: it waits, logs the outage once
(consumer/outages.py), and tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import asyncpg
from aiokafka.errors import KafkaError

from consumer.billing import OUTBOX_COLUMNS, billing_event, encode
from consumer.logs import fields
from consumer.metrics import LedgerMetrics
from consumer.outages import Outage
from consumer.retry import Backoff, as_transient
from producer.client import ProducerResource, thread_key

log = logging.getLogger(__name__)
RELAY_LOCK = 0x70_6C_65_64_67_65_72  # pg advisory lock key: one relay per ledger database
IDLE_SECONDS = 0.5  # how often an idle relay looks for new revisions
PRUNE_SECONDS = 300.0
BACKOFF = Backoff(initial=0.2, maximum=5.0)
BILLING_PARTITIONS = 3  # when the relay creates the billing topic

_PENDING = (
    f"SELECT {OUTBOX_COLUMNS}"  # noqa: S608 - constant column names, no input
    " FROM billing_outbox AS o LEFT JOIN chat_messages AS m ON m.id = o.message_id"
    " WHERE o.published_at IS NULL ORDER BY o.id LIMIT $1"
)


class BillingProducer(ProducerResource):
    def __init__(self, bootstrap_servers: str, topic: str, **kafka_options: object) -> None:
        super().__init__(bootstrap_servers, client_id="token-ledger-relay", **kafka_options)
        self.topic = topic

    async def publish(self, records: list[tuple[bytes, bytes]]) -> None:
        """Send all, then wait for every acknowledgement (in order per partition)."""
        sent = [await self._producer.send(self.topic, value, key=key) for key, value in records]
        await asyncio.gather(*sent)


class Relay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: BillingProducer,
        metrics: LedgerMetrics,
        *,
        retention: timedelta,
        batch: int = 500,
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.metrics = metrics
        self.retention = retention
        self.batch = batch
        self.published = 0
        self._last_prune = 0.0
        self._outage = Outage("billing relay")

    async def publish_pending(self) -> int | None:
        """One pass; the number of revisions published, or None when another relay holds the
        lock."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                return None
            rows = await conn.fetch(_PENDING, self.batch)
            if rows:
                await self.producer.publish(
                    [(thread_key(row["thread_id"]), encode(billing_event(row))) for row in rows]
                )
                await conn.execute(
                    "UPDATE billing_outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                    [row["id"] for row in rows],
                )
        self.published += len(rows)
        return len(rows)

    async def pending(self) -> int:
        async with self.pool.acquire() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM billing_outbox WHERE published_at IS NULL"
            )
        self.metrics.outbox_pending.set(count)
        return count

    async def prune(self) -> int:
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(
                "DELETE FROM billing_outbox WHERE published_at < now() - $1::interval",
                self.retention,
            )
        return int(status.rpartition(" ")[2])

    async def _prune_when_due(self) -> None:
        every = min(PRUNE_SECONDS, self.retention.total_seconds())
        if time.monotonic() - self._last_prune < every:
            return
        self._last_prune = time.monotonic()
        if pruned := await self.prune():
            log.info("billing outbox pruned", extra=fields(rows=pruned))

    async def run(self, stop: asyncio.Event, *, until_empty: bool = False) -> None:
        """Relay until `stop` is set (or, with until_empty, until nothing is pending, whichever
        relay published it)."""
        failures = 0
        while not stop.is_set():
            try:
                published = await self.publish_pending()
                await self._prune_when_due()
                pending = await self.pending()
            except Exception as error:  # no answer stops the relay: wait and try again
                failures += 1
                if as_transient(error) is None and not isinstance(error, KafkaError | OSError):
                    log.exception(
                        "unexpected error in the billing relay: retrying",
                        extra=fields(error=type(error).__name__),
                    )
                self._outage.failing(type(error).__name__)
                await _wait(stop, BACKOFF.delay(failures))
                continue
            failures = 0
            self._outage.recovered()
            if until_empty and pending == 0:
                return
            if not published:
                await _wait(stop, IDLE_SECONDS)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass
