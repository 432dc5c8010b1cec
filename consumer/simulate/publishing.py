"""`token-ledger simulate` publishing its plan: the topic ensured, then every record sent and
acknowledged, with a progress bar."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from consumer.settings import Settings
from producer.client import TurnEventProducer, ensure_topic


async def publish_with_progress(
    settings: Settings, records: list[tuple[bytes, bytes]], partitions: int
) -> None:
    security = settings.kafka_security()
    await ensure_topic(settings.kafka_bootstrap, settings.topic, partitions=partitions, **security)
    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, BarColumn(bar_width=None), transient=False) as progress:
        task = progress.add_task("publishing", total=len(records))
        async with TurnEventProducer(
            settings.kafka_bootstrap, topic=settings.topic, **security
        ) as producer:
            async for acked in producer.publish_records(records):
                progress.advance(task, acked)
