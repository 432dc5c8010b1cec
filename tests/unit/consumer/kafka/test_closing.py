"""Closing aiokafka's consumer whatever its fetcher was doing."""

from __future__ import annotations

import asyncio

import pytest

from consumer.kafka.closing import stop_consumer


class _StrayCancel:
    """aiokafka's consumer whose fetcher, closing, awaits a fetch task cancelled in its retry
    backoff: the CancelledError escapes stop() without anyone cancelling the caller."""

    def __init__(self) -> None:
        self.client_closed = False
        self._client = self

    async def stop(self) -> None:
        retrying = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        retrying.cancel()
        await retrying

    async def close(self) -> None:
        self.client_closed = True


async def test_a_stray_cancellation_from_aiokafka_stop_does_not_escape() -> None:
    consumer = _StrayCancel()
    await stop_consumer(consumer)
    assert consumer.client_closed


async def test_cancelling_the_caller_of_stop_consumer_still_cancels_it() -> None:
    consumer = _StrayCancel()

    async def slow_stop() -> None:
        await asyncio.sleep(3600)

    consumer.stop = slow_stop  # type: ignore[method-assign]
    task = asyncio.create_task(stop_consumer(consumer))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not consumer.client_closed
