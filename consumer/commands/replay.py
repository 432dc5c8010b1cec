"""`token-ledger replay`: rewind the stored offsets, so that the consumers apply a range again
(the ledger must not change)."""

from __future__ import annotations

import logging
from datetime import datetime

from consumer.commands.queries import rewind_offsets
from consumer.commands.reading import (
    database,
    reader,
    topic_partitions,
)
from consumer.settings import Settings

log = logging.getLogger(__name__)


async def replay(
    settings: Settings,
    *,
    from_time: datetime | None = None,
    to_offset: int | None = None,
    partition: int | None = None,
    dry_run: bool = False,
) -> dict[int, tuple[int, int]]:
    """Rewind the stored offsets so that the consumers apply the range again (with dry_run,
    only say where each partition would go); partition -> (stored, rewound)."""
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
        return await rewind_offsets(
            conn, settings.group_id, settings.topic, targets, dry_run=dry_run
        )
