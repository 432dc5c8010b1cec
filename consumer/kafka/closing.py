"""Closing resources: each within a bound (`bounded`), and an aiokafka consumer whatever its
fetcher was doing (`stop_consumer`).

aiokafka 0.14's `Fetcher.close` cancels its pending fetch tasks and awaits them; a task that is
sleeping out its retry backoff after a failed fetch (a request timeout under load, a broker
restart) is not shielded there, so the cancellation escapes `AIOKafkaConsumer.stop()` as a
CancelledError of *our* task, skipping the client's close. Seen at the end of a `verify` of
1,000,000 records: exit 1 with a traceback instead of the report. It is not a cancellation of
the caller: logged and finished here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from consumer.logs import fields

log = logging.getLogger(__name__)


def bounded(
    close: Callable[[], Awaitable[Any]], what: str, seconds: float
) -> Callable[[], Awaitable[None]]:
    """`close`, given up (with a log line) after `seconds`: a hung broker or database must not
    hold a shutdown."""

    async def close_within() -> None:
        try:
            async with asyncio.timeout(seconds):
                await close()
        except TimeoutError:
            log.warning("gave up waiting to close", extra=fields(resource=what))

    return close_within


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`: leaves the group, closes the fetcher and the connections."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled: not the fetcher's stray cancellation
        log.info("a fetch retrying while the Kafka consumer closed was cancelled: closing on")
        await consumer._client.close()  # what stop() skipped (the group was left before)
