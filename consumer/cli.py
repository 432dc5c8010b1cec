"""`token-ledger`: parse arguments, load settings, configure logging, call one coroutine.

No logic lives here. A bad setting exits 2 with one line naming the variable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from consumer.logs import configure_logging
from consumer.settings import Settings, SettingsError, load_settings
from producer.client import TurnEventProducer, ensure_topic
from producer.simulator import TrafficConfig, plan_traffic

app = typer.Typer(
    name="token-ledger",
    help="Kafka -> PostgreSQL ledger of chat messages and LLM token usage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Kafka -> PostgreSQL ledger of chat messages and LLM token usage."""


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        typer.echo(f"token-ledger: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def consume(
    until_idle: Annotated[
        bool, typer.Option(help="exit once every assigned partition is caught up")
    ] = False,
) -> None:
    """Run the consumer: topic -> ledger, with /metrics, /healthz and /readyz."""
    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    from consumer.service import consume as run_consumer
    from consumer.topics import TopicConfigError

    try:
        asyncio.run(run_consumer(settings, until_idle=until_idle))
    except TopicConfigError as exc:
        typer.echo(f"token-ledger: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
) -> None:
    """Create or upgrade the ledger schema (alembic migrations)."""
    settings = _settings()
    from consumer import migrate as migrations

    migrations.upgrade(settings.database_url.get_secret_value(), revision)
    typer.echo(f"database migrated to {revision}")


@app.command()
def simulate(
    threads: Annotated[int, typer.Option(min=1, help="chat threads")] = 100,
    turns: Annotated[int, typer.Option(min=1, help="turns per thread")] = 5,
    seed: Annotated[int, typer.Option(help="same seed, same traffic")] = 1,
    duplicate_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    legacy_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    second_finalize_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.05,
    shuffle_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.2,
    poison_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.01,
    partitions: Annotated[int, typer.Option(min=1, help="if the topic must be created")] = 3,
    expect: Annotated[
        Path | None, typer.Option(help="write the expected ledger summary (JSON) here")
    ] = None,
) -> None:
    """Produce realistic traffic (duplicates, legacy appends, shuffles, poison) to the topic."""
    settings = _settings()
    config = TrafficConfig(
        threads=threads,
        turns_per_thread=turns,
        seed=seed,
        duplicate_rate=duplicate_rate,
        legacy_rate=legacy_rate,
        second_finalize_rate=second_finalize_rate,
        shuffle_rate=shuffle_rate,
        poison_rate=poison_rate,
    )
    records, expectation = plan_traffic(config)
    asyncio.run(_publish(settings, records, partitions))
    summary = expectation.to_json()
    if expect is not None:
        expect.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(
        f"published {summary['records']} records ({summary['duplicates']} duplicates, "
        f"{summary['dead_letters']} poison) to {settings.topic}; expect "
        f"{summary['messages']} messages, {summary['usage_rows']} usage rows, "
        f"cost {summary['total_cost_micros']} micros"
    )


async def _publish(settings: Settings, records: list[tuple[bytes, bytes]], partitions: int) -> None:
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
