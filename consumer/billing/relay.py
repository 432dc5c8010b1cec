"""The outbox relay: pending usage revisions from `billing_outbox` to the billing topic.

One pass (`publish_pending`), in one transaction:
  1. take the relay lock (a transaction-scoped advisory lock: of several consumers, one relays
     at a time, so revisions of one message are never published out of order);
  2. read up to `batch` pending rows in id order, and keep each message's first (a message's
     revision n+1 is written only after the transaction of revision n committed, or in the
     same statement right after it for a reversal and the revision it makes room for: id
     order is revision order);
  3. send them (idempotent producer, acks=all, key = thread_id: one thread, one partition)
     and wait for every acknowledgement;
  4. mark them published; COMMIT.
Killed between 3 and 4, the next pass publishes the same rows again: at-least-once, and a
duplicate is the identical record (consumer/billing/records.py). Published rows older than the
retention are pruned now and then; the usage rows stay the source of truth.

Nothing the broker or the database answers stops the relay: it waits, logs the outage once
(consumer/status.py), and tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

import asyncpg
from aiokafka.errors import KafkaError

from consumer.billing.alert_relay import AlertRelay
from consumer.billing.alert_relay import prune as prune_alerts
from consumer.billing.records import HEADERS, OUTBOX_COLUMNS, billing_event, encode
from consumer.errors import PoisonError, classify_database_error
from consumer.http.metrics import LedgerMetrics
from consumer.kafka.dead_letters import MAX_UNCOMPRESSED_BYTES, REFUSALS
from consumer.logs import fields
from consumer.retry import Backoff, as_transient
from consumer.status import Outage, Readiness
from producer.batches import BATCH_BYTES
from producer.client import ProducerResource, thread_key

log = logging.getLogger(__name__)
RELAY_LOCK = 0x70_6C_65_64_67_65_72  # pg advisory lock key: one relay per ledger database
IDLE_SECONDS = 0.5  # how often an idle relay looks for new revisions
PRUNE_SECONDS = 300.0
# While passes publish, the pending gauge is counted at most this often (the count reads every
# pending row).
COUNT_SECONDS = 1.0
BUILD_SLICE = 16  # records built between two turns of the event loop (~0.15 ms)
BACKOFF = Backoff(initial=0.2, maximum=5.0)
BILLING_PARTITIONS = 3  # when the relay creates the billing topic

# The first pending rows in id order (the partial index on pending ids, no scan of every pending
# row): of them, the relay sends per message only its oldest pending revision (`_oldest_each`),
# so that revision n+1 is sent only once n is acked and a revision the broker refuses can never
# be overtaken by a later one of the same message. Revisions refused for good ($2) are left
# where they are, and with them their message's later ones.
_PENDING = (
    f"SELECT {OUTBOX_COLUMNS}"  # noqa: S608 - constant column names, no input
    " FROM billing_outbox AS o LEFT JOIN chat_messages AS m ON m.id = o.message_id"
    " WHERE o.published_at IS NULL AND o.usage_id <> ALL($2::bigint[])"
    " ORDER BY o.id LIMIT $1"
)
_PENDING_IDS = (
    "SELECT o.id, o.usage_id, o.revision FROM billing_outbox AS o"
    " WHERE o.published_at IS NULL AND o.usage_id <> ALL($2::bigint[])"
    " ORDER BY o.id LIMIT $1"
)
_PENDING_ROW = (
    f"SELECT {OUTBOX_COLUMNS}"  # noqa: S608 - constant column names, no input
    " FROM billing_outbox AS o LEFT JOIN chat_messages AS m ON m.id = o.message_id"
    " WHERE o.id = $1"
)
_COUNT_PENDING = (
    "SELECT count(*) AS pending,"
    " count(*) FILTER (WHERE usage_id <> ALL($1::bigint[])) AS publishable"
    " FROM billing_outbox WHERE published_at IS NULL"
)


class BillingProducer(ProducerResource):
    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        alert_topic: str,
        **kafka_options: object,
    ) -> None:
        # Like the dead-letter producer: compressed, and no client-side size limit below the
        # broker's (which judges the compressed batch).
        super().__init__(
            bootstrap_servers,
            client_id="token-ledger-relay",
            max_request_size=MAX_UNCOMPRESSED_BYTES,
            compression_type="zstd",
            max_batch_size=BATCH_BYTES,
            **kafka_options,
        )
        self.topic = topic
        self.alert_topic = alert_topic

    async def publish_alerts(
        self, records: list[tuple[bytes, bytes]]
    ) -> list[BaseException | None]:
        """Budget alerts, as `publish` sends revisions (structured-mode CloudEvents)."""
        return await self.send_all(
            self.alert_topic, [(key, value, list(HEADERS)) for key, value in records]
        )

    async def publish(self, records: list[tuple[bytes, bytes]]) -> list[BaseException | None]:
        """Send all, then wait for every acknowledgement; per record, None (acked) or why not.
        A refusal of one record does not stop the others (each message has one record here).
        Every record says `content-type: application/cloudevents+json` (structured mode)."""
        return await self.send_all(
            self.topic, [(key, value, list(HEADERS)) for key, value in records]
        )


class Relay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: BillingProducer,
        metrics: LedgerMetrics,
        *,
        retention: timedelta,
        batch: int = 500,
        prepare: Callable[[], Awaitable[None]] | None = None,
        prepare_alerts: Callable[[], Awaitable[None]] | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.metrics = metrics
        self.retention = retention
        self.batch = batch
        self.prepare = prepare  # e.g. the billing topic ensured: retried like any pass
        # (the budget topic: ensured by the alerts' share, see AlertRelay)
        self.readiness = readiness  # where held-back revisions are reported (/readyz)
        self.published = 0
        # usage id -> (revision id, why): refused for good by the broker, or a revision that
        # cannot be read or built; until a restart, that message's revisions wait (nothing
        # later of it may overtake the held one).
        self.refused: dict[int, tuple[str, str]] = {}
        self._last_prune = 0.0
        self._last_count = 0.0
        self._outage = Outage("billing relay")
        self.alerts = AlertRelay(producer.publish_alerts, batch, prepare=prepare_alerts)

    async def publish_pending(self) -> int | None:
        """One pass; the number of revisions and alerts published, or None when another relay
        holds the lock. A revision the broker refuses for good, or that cannot be read or built,
        is logged and set aside; any other failure raises (the pass rolls back and is tried
        again). Revisions and budget alerts commit apart: a budget topic that is missing or
        down holds back the alerts, never the billing revisions before them."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                    return None
                revisions = await self._publish_revisions(conn)
            self.published += revisions
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                    return revisions
                alerts = await self.alerts.publish_pending(conn)
        for kind, measure, threshold in alerts.published:
            self.metrics.budget_alerts.labels(kind, measure, str(threshold)).inc()
        self._held_changed()
        return revisions + len(alerts.published)

    async def _publish_revisions(self, conn: asyncpg.Connection) -> int:
        """The usage revisions' share of a pass (steps 2 to 4), in its transaction."""
        try:
            async with conn.transaction():  # a savepoint: see _readable
                rows = _oldest_each(await conn.fetch(_PENDING, self.batch, sorted(self.refused)))
        except asyncpg.PostgresError as failure:
            # Only what a row's data causes (a value too large to print): a privilege, a
            # table or a column missing would fail every row alike, and is retried.
            if not isinstance(classify_database_error(failure), PoisonError):
                raise
            rows = await self._readable(conn)
        if not rows:
            return 0
        built = await self._build(rows)
        rows = [row for row, _ in built]
        results = await self.producer.publish([record for _, record in built])
        acked = []
        for row, error in zip(rows, results, strict=True):
            if error is None:
                acked.append(row["id"])
            elif isinstance(error, REFUSALS):
                self._refuse(row, error)
            else:  # retriable: the whole pass again (what was acked is sent again)
                raise error
        await conn.execute(
            "UPDATE billing_outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
            acked,
        )
        return len(acked)

    async def _readable(self, conn: asyncpg.Connection) -> list[asyncpg.Record]:
        """The pending rows read one at a time, after reading them together failed for a reason
        no retry cures (a value PostgreSQL cannot print, written by an older release): a row
        that fails alone is held back, so that it stops its own message only."""
        ids = _oldest_each(await conn.fetch(_PENDING_IDS, self.batch, sorted(self.refused)))
        rows = []
        for pending in ids:
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(_PENDING_ROW, pending["id"])
            except asyncpg.PostgresError as error:
                if not isinstance(classify_database_error(error), PoisonError):
                    raise
                self._refuse(pending, error, "cannot be read")
                continue
            if row is not None:
                rows.append(row)
        return rows

    async def _build(
        self, rows: list[asyncpg.Record]
    ) -> list[tuple[asyncpg.Record, tuple[bytes, bytes]]]:
        """Each row with its record; a row whose record cannot be built (a stored value no
        encoder takes: a bug, or a ledger written before numbers were bounded at decode) is set
        aside like a refused one, so that it holds back its own message only."""
        built = []
        for index, row in enumerate(rows):
            if index % BUILD_SLICE == BUILD_SLICE - 1:
                # A pass builds hundreds of records: the batch transaction running beside it
                # sends its next statement as soon as PostgreSQL answers, not after the pass.
                await asyncio.sleep(0)
            try:
                built.append((row, (thread_key(row["thread_id"]), encode(billing_event(row)))))
            except MemoryError:
                raise  # a moment of memory pressure: the pass is tried again
            except Exception as error:  # noqa: BLE001 - one row must not stop every tenant's billing
                self._refuse(row, error, "cannot be built")
        return built

    def _refuse(
        self, row: Mapping[str, object], error: BaseException, what: str = "refused by the topic"
    ) -> None:
        event_id = f"{row['usage_id']}:{row['revision']}"
        reason = f"{what}: {type(error).__name__}"
        self.refused[int(str(row["usage_id"]))] = (event_id, reason)
        self._held_changed()
        log.error(
            "billing revision held back: it and its message's later revisions wait",
            extra=fields(id=event_id, error=reason),
        )

    def held(self) -> dict[str, str]:
        """Record id -> why, for every revision and budget alert held back."""
        return {**dict(self.refused.values()), **dict(self.alerts.refused.values())}

    def _held_changed(self) -> None:
        self.metrics.billing_refused.set(len(self.refused) + len(self.alerts.refused))
        if self.readiness is not None:
            self.readiness.billing_held = self.held()

    async def pending(self) -> tuple[int, int]:
        """(pending, publishable) revisions and alerts: what waits, and what of it is not held
        by a refusal."""
        self._last_count = time.monotonic()
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_COUNT_PENDING, sorted(self.refused))
            alerts, publishable_alerts = await self.alerts.pending(conn)
        self.metrics.outbox_pending.set(row["pending"])
        self.metrics.budget_alerts_pending.set(alerts)
        return row["pending"] + alerts, row["publishable"] + publishable_alerts

    async def _count_pending(self) -> None:
        """The pending gauge after a failed pass: what waits still shows while the relay cannot
        publish. When the database is the failure this fails too, and the outage is logged."""
        try:
            await self.pending()
        except Exception as error:  # noqa: BLE001 - the pass's own failure is being handled
            log.debug("counting pending revisions failed", extra=fields(error=type(error).__name__))

    async def prune(self) -> int:
        async with self.pool.acquire() as conn:
            status: str = await conn.execute(
                "DELETE FROM billing_outbox WHERE published_at < now() - $1::interval",
                self.retention,
            )
            alerts = await prune_alerts(conn, self.retention)
        return int(status.rpartition(" ")[2]) + alerts

    async def _prune_when_due(self) -> None:
        every = min(PRUNE_SECONDS, self.retention.total_seconds())
        if time.monotonic() - self._last_prune < every:
            return
        self._last_prune = time.monotonic()
        if pruned := await self.prune():
            log.info("billing outbox pruned", extra=fields(rows=pruned))

    async def run(self, stop: asyncio.Event, *, until_empty: bool = False) -> None:
        """Relay until `stop` is set (or, with until_empty, until nothing publishable is
        pending, whichever relay published it: see `refused` for what could not be)."""
        failures = 0
        prepared = self.prepare is None
        while not stop.is_set():
            try:
                if not prepared and self.prepare is not None:
                    await self.prepare()
                    prepared = True
                published = await self.publish_pending()
                await self._prune_when_due()
                publishable = None  # while passes publish, counted every COUNT_SECONDS
                if not published or time.monotonic() - self._last_count >= COUNT_SECONDS:
                    _, publishable = await self.pending()
            except Exception as error:  # no answer stops the relay: wait and try again
                failures += 1
                if as_transient(error) is None and not isinstance(error, KafkaError | OSError):
                    log.exception(
                        "unexpected error in the billing relay: retrying",
                        extra=fields(error=type(error).__name__),
                    )
                self._outage.failing(type(error).__name__)
                await self._count_pending()
                await _wait(stop, BACKOFF.delay(failures))
                continue
            failures = 0
            self._outage.recovered()
            if until_empty and publishable == 0:
                return
            if not published:
                await _wait(stop, IDLE_SECONDS)


def _oldest_each(rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """Of pending rows in id order, each message's first: every earlier pending revision of a
    message has a smaller id, so it is among them (a revision n+1 is written only after n)."""
    seen: set[int] = set()
    oldest = []
    for row in rows:
        if row["usage_id"] not in seen:
            seen.add(row["usage_id"])
            oldest.append(row)
    return oldest


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass
