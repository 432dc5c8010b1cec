"""`token-ledger replay`: rewind the stored offsets, so that the consumers apply a range again
(the ledger must not change), and move the group's offsets in Kafka with them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from consumer.commands.queries import rewind_offsets
from consumer.commands.reading import (
    database,
    reader,
    topic_partitions,
)
from consumer.kafka.closing import stop_consumer
from consumer.settings import Settings

log = logging.getLogger(__name__)
MIRROR_SECONDS = 15.0  # finding the group's coordinator and one commit


@dataclass
class Replayed:
    # partition -> (stored, rewound); empty: the group has no stored offsets for the topic
    moves: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Kafka's committed offsets of the group now equal the rewound ones (not with dry_run)
    mirrored: bool = False
    # Why they do not: e.g. consumers of the group are running (they mirror the new offsets
    # once they apply from them)
    not_mirrored: str | None = None


async def replay(
    settings: Settings,
    *,
    from_time: datetime | None = None,
    to_offset: int | None = None,
    partition: int | None = None,
    dry_run: bool = False,
) -> Replayed:
    """Rewind the stored offsets so that the consumers apply the range again (with dry_run,
    only say where each partition would go), then commit them to the Kafka group, whose
    offsets mirror the stored ones for lag tooling."""
    async with reader(settings) as consumer, database(settings) as conn:
        partitions = [
            tp
            for tp in await topic_partitions(settings, settings.topic, variable="LEDGER_TOPIC")
            if partition is None or tp.partition == partition
        ]
        if from_time is not None:
            found = await consumer.offsets_for_times(
                {tp: int(from_time.timestamp() * 1000) for tp in partitions}
            )
            ends = await consumer.end_offsets(partitions)
            targets = {
                tp.partition: found[tp].offset if found.get(tp) else ends[tp] for tp in partitions
            }
        else:
            assert to_offset is not None
            targets = {tp.partition: to_offset for tp in partitions}
        moves = await rewind_offsets(
            conn, settings.group_id, settings.topic, targets, dry_run=dry_run
        )
    done = Replayed(moves)
    if moves and not dry_run:
        done.not_mirrored = await mirror_to_group(
            settings, {p: new for p, (_, new) in moves.items()}
        )
        done.mirrored = done.not_mirrored is None
    return done


async def mirror_to_group(settings: Settings, offsets: Mapping[int, int]) -> str | None:
    """Commit `offsets` as the group's offsets in Kafka; None when done, else why not.

    From outside the group (no member id, generation -1), which Kafka accepts only while the
    group has no active member: running consumers own the offsets, and mirror the rewound ones
    after their next batch (they seek to the stored offsets first)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.group_id,  # assigned by hand below: it never joins the group
        enable_auto_commit=False,
        **settings.kafka_security(),
    )
    tps = {TopicPartition(settings.topic, p): OffsetAndMetadata(o, "") for p, o in offsets.items()}
    try:
        async with asyncio.timeout(MIRROR_SECONDS):
            await consumer.start()
            consumer.assign(list(tps))
            with _quiet_coordinator():
                await consumer.commit(tps)
    except CommitFailedError:
        return (
            "consumers of the group are running: they mirror the new offsets once they apply them"
        )
    except (KafkaError, TimeoutError) as error:
        return f"Kafka did not take the commit ({type(error).__name__})"
    finally:
        await stop_consumer(consumer)
    return None


@contextmanager
def _quiet_coordinator() -> Iterator[None]:
    """aiokafka logs a refused commit at ERROR ("will rejoin"); the caller says it in one line."""
    logger = logging.getLogger("aiokafka.consumer.group_coordinator")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
