"""What the pipeline takes from Kafka for a batch, within LEDGER_MAX_BATCH records and
LEDGER_MAX_BATCH_BYTES of values:

- `fetch`: the carry, if the last fetch returned more than a batch holds; else a fetch, waiting
  for records;
- `more`: while the batch in flight commits, what Kafka buffered since (without waiting), so
  the next transaction holds every record that arrived meanwhile.

Every record of a fetch is applied before the next fetch, whatever its partition: what goes
beyond the bounds is carried over as the next batch, and nothing is fetched while a carry
waits. Records are sorted by (partition, offset) within a fetch, and a fetch continues each
partition where the last one ended, so a batch holds each partition's records in order.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import NoOffsetForPartitionError

from consumer.kafka.lag import Lag
from consumer.kafka.waiting import IdleClock
from consumer.ledger.batch import Record
from consumer.settings import Settings

FETCH_WAIT_MS = 500


class Intake:
    def __init__(
        self, settings: Settings, consumer: AIOKafkaConsumer, lag: Lag, idle: IdleClock
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.lag = lag
        self.idle = idle
        # Fetched beyond the bounds: the next batch, if no seek came between.
        self.carry: list[Record] = []
        self.carry_generation = 0
        # The batch being taken: its records and bytes of values so far.
        self._taken = 0
        self._bytes = 0

    async def fetch(self, generation: int) -> list[Record]:
        """The next batch: the carry, else a fetch. `generation`: the checkpoints' when the
        fetch began. Raises what aiokafka's getmany raises (OffsetOutOfRangeError: the
        caller's to handle); a fetch that raced an assignment returns nothing."""
        self._taken = self._bytes = 0
        if self.carry:
            carried, self.carry = self.carry, []
            return self._within_bounds(carried, generation)
        try:
            with self.idle.waiting_on("kafka"):
                fetched = await self.consumer.getmany(
                    timeout_ms=FETCH_WAIT_MS, max_records=self.settings.max_batch
                )
        except NoOffsetForPartitionError:
            # A fetch that raced the assignment, before the partition was sought to the
            # stored offset (the start never depends on Kafka's group offsets).
            return []
        return self._accepted(fetched, generation)

    def stale_carry(self, generation: int, *, seeking: bool) -> list[Record]:
        """The carry, given back if a seek came since it was fetched or is about to
        (`seeking`): fetched again like stale records (their partitions sought to where the
        ledger stands), never applied from old positions."""
        if self.carry and (self.carry_generation != generation or seeking):
            stale, self.carry = self.carry, []
            return stale
        return []

    def full(self) -> bool:
        """Nothing more may join the batch that `fetch` began: a bound is reached, or a carry
        waits."""
        return bool(self.carry) or self._taken >= self.settings.max_batch

    async def more(self, generation: int) -> list[Record]:
        """What Kafka buffered since, for the batch that `fetch` began (at `generation`),
        within the room its bounds leave, without waiting."""
        if self.full():
            return []
        try:
            fetched = await self.consumer.getmany(
                timeout_ms=0, max_records=self.settings.max_batch - self._taken
            )
        except NoOffsetForPartitionError:
            return []
        return self._accepted(fetched, generation)

    def _accepted(
        self, fetched: Mapping[TopicPartition, list[Record]], generation: int
    ) -> list[Record]:
        records = sorted(
            (r for rs in fetched.values() for r in rs), key=lambda r: (r.partition, r.offset)
        )
        self.lag.fetched(records, generation)
        return self._within_bounds(records, generation)

    def _within_bounds(self, records: list[Record], generation: int) -> list[Record]:
        """The first records that keep the batch within LEDGER_MAX_BATCH_BYTES of values (a
        batch holds at least one record). The rest is carried over."""
        budget = self.settings.max_batch_bytes - self._bytes
        for index, record in enumerate(records):
            size = len(record.value or b"")
            budget -= size
            if budget < 0 and (index > 0 or self._taken > 0):
                self.carry, self.carry_generation = records[index:], generation
                return records[:index]
            self._taken += 1
            self._bytes += size
        return records
