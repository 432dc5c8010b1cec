"""Now and then, the log start offsets of the partitions this consumer owns, and what its
group remembers below them forgotten (consumer/ledger/forgetting.py): without it,
`applied_records` and `dead_lettered` grow for as long as the topic is consumed.

It runs beside the pipeline and never stops it: a broker or a database that does not answer
now is asked again at the next pass; a role without DELETE on those tables is said once (a
WARNING naming the grant), and the rows are kept. A stop cancels a pass: each of its
statements is a transaction of its own.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from consumer.ledger.forgetting import Forgotten, forget_below
from consumer.logs import fields

log = logging.getLogger(__name__)

FIRST_SECONDS = 10.0  # after the start: the group is joined by then, usually
EVERY_SECONDS = 600.0
ASK_SECONDS = 10.0  # the broker's answer, and a pooled connection


class LogStartWatch:
    def __init__(
        self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool, group_id: str, topic: str
    ) -> None:
        self.consumer = consumer
        self.pool = pool
        self.group_id = group_id
        self.topic = topic
        self._denial_said = False

    async def run(self) -> None:
        """Until cancelled."""
        wait = FIRST_SECONDS
        while True:
            await asyncio.sleep(wait)
            wait = EVERY_SECONDS
            try:
                await self.forget()
            except Exception as error:
                log.exception(
                    "forgetting positions below the log start failed",
                    extra=fields(error=type(error).__name__),
                )

    async def forget(self) -> Forgotten | None:
        """One pass: None when the broker or the database could not be asked now."""
        owned = sorted(self.consumer.assignment())
        if not owned:
            return None
        try:
            async with asyncio.timeout(ASK_SECONDS):
                starts = await self.consumer.beginning_offsets(owned)
        except (KafkaError, TimeoutError) as error:
            log.info(
                "log start offsets unknown now: nothing forgotten",
                extra=fields(error=type(error).__name__),
            )
            return None
        by_partition = {tp.partition: offset for tp, offset in starts.items()}
        try:
            async with self.pool.acquire(timeout=ASK_SECONDS) as conn:
                forgotten = await forget_below(conn, self.group_id, self.topic, by_partition)
        except asyncpg.InsufficientPrivilegeError as denied:
            if not self._denial_said:
                self._denial_said = True
                # The server's line names the table ("permission denied for table ..."),
                # never a value.
                log.warning(
                    f"cannot forget positions below the log start ({str(denied).splitlines()[0]}):"
                    " the rows are kept; grant DELETE on applied_records and dead_lettered"
                )
            return None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as error:
            log.info(
                "the database could not forget positions now",
                extra=fields(error=type(error).__name__),
            )
            return None
        if forgotten:
            log.info(
                "forgot positions below the log start",
                extra=fields(
                    applied_rows=forgotten.applied_rows,
                    dead_lettered=forgotten.dead_lettered,
                    log_start=by_partition,
                ),
            )
        return forgotten
