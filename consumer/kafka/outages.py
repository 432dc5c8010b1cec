"""The broker's outages as a handful of log lines (consumer/status.py `Outage`).

`KafkaLogFilter` takes aiokafka's own connection complaints (an ERROR every reconnect attempt,
several a second) off the log and turns them into the broker's `Outage`; anything else aiokafka
says still passes, at most once a minute per message. `KafkaProbe` asks the broker for metadata
while it seems down: the answer is what ends the outage.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from consumer.status import REMINDER_SECONDS, Outage, Readiness

log = logging.getLogger(__name__)
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
