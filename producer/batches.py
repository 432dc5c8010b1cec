"""Records published together: a few batches per partition instead of one send each, every
acknowledgement awaited before returning (dead letters, billing revisions). aiokafka's
`send_batch` takes a batch for a partition we choose, so the partition is chosen here as its
default partitioner would (murmur2 of the key, `partition_of`).
"""

from __future__ import annotations

import asyncio
import functools
import random
import struct
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

# (key, value, headers) of a record to publish.
OutgoingRecord = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]
# The batches send_all fills (aiokafka's max_batch_size): a few dozen records each.
BATCH_BYTES = 256 * 1024
_M = 0x5BD1E995
_WORDS = struct.Struct("<I").iter_unpack
# What the broker (or the client) answers for a batch larger than the topic takes.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


# Recent keys only: a thread's revisions come close together, and each entry costs ~250 bytes
# (65,536 of them grew a 1,000,000-record drain's peak RSS by 17 MiB).
@functools.lru_cache(maxsize=4_096)
def murmur2(key: bytes) -> int:
    """Kafka's murmur2 (Utils.murmur2), equal to aiokafka's pure-Python one, which takes
    ~9 µs a key, word by word in less: a billing pass hashes each revision's thread key, and a
    thread's revisions come back to the same key."""
    length = len(key)
    h = 0x9747B28C ^ length
    body = length & ~3
    for (k,) in _WORDS(key[:body]):
        k = (k * _M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * _M) & 0xFFFFFFFF
        h = ((h * _M) & 0xFFFFFFFF) ^ k
    tail = length & 3
    if tail:
        if tail == 3:
            h ^= key[body + 2] << 16
        if tail >= 2:
            h ^= key[body + 1] << 8
        h = ((h ^ key[body]) * _M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_of(key: bytes | None, partitions: Sequence[int]) -> int:
    """The partition aiokafka's default partitioner gives a key (`partitions` sorted); a record
    without a key goes to a random one, as there."""
    if key is None:
        return random.choice(partitions)  # noqa: S311 - spreading records, not a secret
    # The cache needs a hashable key: a bytearray or writable memoryview, which aiokafka sends
    # too, is hashed as the bytes it holds.
    hashable = key if type(key) is bytes else bytes(key)
    return partitions[(murmur2(hashable) & 0x7FFFFFFF) % len(partitions)]


async def send_all(
    producer: AIOKafkaProducer, topic: str, records: Sequence[OutgoingRecord]
) -> list[BaseException | None]:
    """Send every record, then wait for every acknowledgement. The records go out as a few
    batches per partition (the partition the key gives, as aiokafka's default partitioner
    would choose it), not one by one. Per record, None (acked) or why not: a record is
    refused only for what it is itself. A batch the broker finds too large (a topic whose
    limit is below the batch) refuses records it would take one by one, so its records are
    sent again, each alone."""
    try:
        partitions = sorted(await producer.partitions_for(topic))
    except KafkaError as error:  # e.g. no metadata in time: every record waits
        return [error] * len(records)
    by_partition: dict[int, list[int]] = {}
    for index, (key, _, _) in enumerate(records):
        by_partition.setdefault(partition_of(key, partitions), []).append(index)
    results, shared = await _send_batches(producer, topic, records, by_partition, together=True)
    again: dict[int, list[int]] = {}
    for partition, indexes in by_partition.items():
        for index in indexes:
            if index in shared and isinstance(results[index], _TOO_LARGE):
                again.setdefault(partition, []).append(index)
    if again:
        alone, _ = await _send_batches(producer, topic, records, again, together=False)
        for indexes in again.values():
            for index in indexes:
                results[index] = alone[index]
    return results


async def _send_batches(
    producer: AIOKafkaProducer,
    topic: str,
    records: Sequence[OutgoingRecord],
    by_partition: dict[int, list[int]],
    *,
    together: bool,
) -> tuple[list[BaseException | None], set[int]]:
    """Send the records of each partition as batches (together), or each in a batch of its
    own; wait for every acknowledgement. Per record, None or why not, and which records
    shared a batch. A record larger than half a batch always travels alone."""
    sent: list[tuple[list[int], asyncio.Future[object] | BaseException]] = []
    for partition, indexes in by_partition.items():
        members: list[int] = []
        batch = producer.create_batch()
        for index in indexes:
            key, value, headers = records[index]
            alone = not together or len(value or b"") > BATCH_BYTES // 2
            if members and (
                alone or batch.append(timestamp=None, key=key, value=value, headers=headers) is None
            ):
                sent.append((members, await _send_batch(producer, batch, topic, partition)))
                members, batch = [], producer.create_batch()
            if not members:  # an empty batch takes any record
                batch.append(timestamp=None, key=key, value=value, headers=headers)
            members.append(index)
            if alone:
                sent.append((members, await _send_batch(producer, batch, topic, partition)))
                members, batch = [], producer.create_batch()
        if members:
            sent.append((members, await _send_batch(producer, batch, topic, partition)))
    outcomes = await asyncio.gather(
        *(_settled(future) for _, future in sent), return_exceptions=True
    )
    results: list[BaseException | None] = [None] * len(records)
    shared: set[int] = set()
    for (members, _), outcome in zip(sent, outcomes, strict=True):
        if len(members) > 1:
            shared.update(members)
        if isinstance(outcome, BaseException):
            for index in members:
                results[index] = outcome
    return results, shared


async def _send_batch(
    producer: AIOKafkaProducer, batch: Any, topic: str, partition: int
) -> asyncio.Future[object] | BaseException:
    try:
        future: asyncio.Future[object] = await producer.send_batch(
            batch, topic, partition=partition
        )
    except KafkaError as error:  # refused before sending
        refused: BaseException = error
        return refused
    return future


async def _settled(item: asyncio.Future[object] | BaseException) -> object:
    if isinstance(item, BaseException):
        raise item
    return await item
