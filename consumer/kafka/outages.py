"""Outages of the broker or the database as a handful of log lines, not one per retry.

An `Outage` logs once when a dependency starts failing, reminds at most once a minute while
it lasts, and logs once when it ends (SPEC section 4). `KafkaLogFilter` takes aiokafka's own
connection complaints (an ERROR every reconnect attempt, i.e. several a second) off the log
and turns them into the broker's `Outage`; anything else aiokafka says still passes, at most
once a minute per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from consumer.logs import fields

if TYPE_CHECKING:
    from consumer.http.health import Readiness

log = logging.getLogger(__name__)
REMINDER_SECONDS = 60.0
PROBE_SECONDS = 5.0  # while the broker seems down, ask it for metadata this often
# What aiokafka says while it cannot reach a broker (connection, metadata, coordinator).
_CONNECTION_WORDS = (
    "connect",
    "connection",
    "unable to update metadata",
    "timed out",
    "timeout",
    "failed fetch messages",
    "unknown error fetching data",
    "nodenotready",
    "not available",
)


class Outage:
    """One dependency's availability, for the log and for /readyz."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self._last_line = 0.0
        self._attempts = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failing(self, detail: str) -> None:
        now = time.monotonic()
        self._attempts += 1
        if self.since is None:
            self.since = self._last_line = now
            log.warning(f"{self.what} unreachable", extra=fields(error=detail))
        elif now - self._last_line >= REMINDER_SECONDS:
            self._last_line = now
            log.warning(
                f"{self.what} still unreachable",
                extra=fields(
                    error=detail, seconds=round(now - self.since), attempts=self._attempts
                ),
            )

    def recovered(self) -> None:
        if self.since is not None:
            log.info(
                f"{self.what} reachable again",
                extra=fields(seconds=round(time.monotonic() - self.since, 1)),
            )
            self.since = None
            self._attempts = 0


class KafkaLogFilter(logging.Filter):
    """Attached by the service to the root logger's handlers, not to the `aiokafka` logger: a
    logger's filters see only what is logged on that very logger, and aiokafka's coordinator,
    fetcher and connections log on child loggers (`aiokafka.consumer.fetcher`, ...), whose
    records reach the handlers without passing the parent logger's filters."""

    def __init__(self, outage: Outage) -> None:
        super().__init__()
        self.outage = outage
        self._last_seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _from_aiokafka(record):
            return True
        message = record.getMessage()
        if any(word in message.lower() for word in _CONNECTION_WORDS):
            self.outage.failing(message[:200])
            return False
        now = time.monotonic()
        template = str(record.msg)
        if now - self._last_seen.get(template, -REMINDER_SECONDS) < REMINDER_SECONDS:
            return False
        self._last_seen[template] = now
        return True


def _from_aiokafka(record: logging.LogRecord) -> bool:
    return record.name == "aiokafka" or record.name.startswith("aiokafka.")


class KafkaProbe:
    """While aiokafka reports trouble reaching the broker, ask it for metadata now and then:
    the answer is what ends the outage (for the log and /readyz)."""

    def __init__(self, consumer: AIOKafkaConsumer, kafka: Outage, readiness: Readiness) -> None:
        self.consumer = consumer
        self.kafka = kafka
        self.readiness = readiness
        self._last = 0.0

    async def __call__(self) -> None:
        now = time.monotonic()
        self.readiness.kafka_ok = not self.kafka.down
        if not self.kafka.down or now - self._last < PROBE_SECONDS:
            return
        self._last = now
        try:
            async with asyncio.timeout(PROBE_SECONDS / 2):
                await self.consumer.topics()
        except (KafkaError, TimeoutError) as error:
            self.kafka.failing(type(error).__name__)
        else:
            self.kafka.recovered()
        self.readiness.kafka_ok = not self.kafka.down
