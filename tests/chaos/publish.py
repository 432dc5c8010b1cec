"""The simulator's plan published at a steady pace while faults happen, through broker kills.

Sent in chunks, each acknowledged before the next; a chunk that fails (the broker died under
it) is sent again whole by a new producer once the broker is back. What reached the topic the
first time is then there twice: exact copies, which the ledger must drop (poison sent twice
is two dead letters, at two source positions, which the checks read from the topic itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from producer.client import TurnEventProducer

Record = tuple[bytes, bytes]
log = logging.getLogger("chaos.publish")


async def publish_paced(
    bootstrap: str, topic: str, records: list[Record], seconds: float, chunk: int = 250
) -> int:
    """Publish every record within about `seconds`; returns how many chunks were re-sent."""
    started, resent = time.monotonic(), 0
    chunks = [records[i : i + chunk] for i in range(0, len(records), chunk)]
    producer: TurnEventProducer | None = None
    try:
        for index, part in enumerate(chunks):
            deadline = time.monotonic() + 180
            while True:
                try:
                    if producer is None:
                        producer = TurnEventProducer(
                            bootstrap,
                            topic=topic,
                            request_timeout_ms=10_000,
                            max_request_size=2**21,
                        )
                        await asyncio.wait_for(producer.__aenter__(), 15)
                    await asyncio.wait_for(_send(producer, part), 30)
                    break
                except Exception as error:
                    if time.monotonic() > deadline:
                        raise
                    log.info("chunk %d failed (%s): sending it again", index, type(error).__name__)
                    resent += 1
                    if producer is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(producer.close(), 10)
                        producer = None
                    await asyncio.sleep(1)
            # The pace: chunk i is due at i/len of the window.
            due = started + seconds * (index + 1) / len(chunks)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    finally:
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.close(), 10)
    return resent


async def _send(producer: TurnEventProducer, part: list[Record]) -> None:
    async for _ in producer.publish_records(part, window=len(part)):
        pass
