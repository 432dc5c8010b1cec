"""`consume`, `relay`, `migrate` and `simulate`: the commands that run the ledger or feed it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from consumer.cli.app import app, settings_or_exit
from consumer.failures import ExitCode, fatal_line
from consumer.logs import configure_logging
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic


@app.command()
def consume(
    until_idle: Annotated[
        bool, typer.Option(help="exit once every assigned partition is caught up")
    ] = False,
) -> None:
    """Run the consumer: topic -> ledger, with /metrics, /healthz and /readyz."""
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    from consumer.service import consume as run_consumer

    unfinished = asyncio.run(run_consumer(settings, until_idle=until_idle))
    if not until_idle or not unfinished:
        return
    # It could not finish these (each logged as ERROR when it happened).
    if halted := unfinished.partitions:
        stopped = "; ".join(f"partition {p}: {why}" for p, why in sorted(halted.items()))
        fatal_line(f"partitions stopped: {stopped}", ExitCode.CHECK_FAILED, settings)
    if refused := unfinished.billing:
        listed = "; ".join(f"{rev}: {why}" for rev, why in sorted(refused.items()))
        fatal_line(f"billing revisions held back: {listed}", ExitCode.CHECK_FAILED, settings)
    raise typer.Exit(1)


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
) -> None:
    """Create or upgrade the ledger schema (alembic migrations)."""
    settings = settings_or_exit()
    from consumer.ledger.schema import migrate as run_migrate

    typer.echo(run_migrate(settings, revision))


@app.command()
def simulate(
    threads: Annotated[int, typer.Option(min=1, help="chat threads")] = 100,
    turns: Annotated[int, typer.Option(min=1, help="turns per thread")] = 5,
    seed: Annotated[int, typer.Option(help="same seed, same traffic")] = 1,
    duplicate_rate: Annotated[
        float, typer.Option(min=0, max=1, help="records re-sent right after, as exact copies")
    ] = 0.1,
    legacy_rate: Annotated[
        float, typer.Option(min=0, max=1, help="turns with legacy message.appended beside them")
    ] = 0.1,
    second_finalize_rate: Annotated[
        float, typer.Option(min=0, max=1, help="turns finalized twice (the first cost wins)")
    ] = 0.05,
    shuffle_rate: Annotated[
        float, typer.Option(min=0, max=1, help="threads whose records are published shuffled")
    ] = 0.2,
    poison_rate: Annotated[
        float, typer.Option(min=0, max=10, help="poison records per turn (at its thread's end)")
    ] = 0.01,
    legacy_partial_rate: Annotated[
        float, typer.Option(min=0, max=1, help="legacy breakdowns partial per model")
    ] = TrafficConfig.legacy_partial_rate,
    legacy_empty_rate: Annotated[
        float, typer.Option(min=0, max=1, help="legacy breakdowns sent as {}")
    ] = TrafficConfig.legacy_empty_rate,
    legacy_null_rate: Annotated[
        float, typer.Option(min=0, max=1, help="legacy breakdowns sent as null")
    ] = TrafficConfig.legacy_null_rate,
    v0_resend_rate: Annotated[
        float, typer.Option(min=0, max=1, help="v0 bodies re-sent after everything else")
    ] = TrafficConfig.v0_resend_rate,
    retry_rate: Annotated[
        float, typer.Option(min=0, max=1, help="records re-sent later by a producer retry")
    ] = TrafficConfig.retry_rate,
    unknown_field_rate: Annotated[
        float, typer.Option(min=0, max=1, help="calls, parts, envelopes with unknown fields")
    ] = TrafficConfig.unknown_field_rate,
    partitions: Annotated[int, typer.Option(min=1, help="if the topic must be created")] = 3,
    expect: Annotated[
        Path | None, typer.Option(help="write the expected ledger summary (JSON) here")
    ] = None,
) -> None:
    """Produce realistic traffic (duplicates, retries, legacy appends with loose breakdowns,
    v0 re-sends, unknown fields, shuffles, poison) to the topic."""
    settings = settings_or_exit()
    try:
        config = TrafficConfig(
            threads=threads,
            turns_per_thread=turns,
            seed=seed,
            duplicate_rate=duplicate_rate,
            legacy_rate=legacy_rate,
            second_finalize_rate=second_finalize_rate,
            shuffle_rate=shuffle_rate,
            poison_rate=poison_rate,
            legacy_partial_rate=legacy_partial_rate,
            legacy_empty_rate=legacy_empty_rate,
            legacy_null_rate=legacy_null_rate,
            v0_resend_rate=v0_resend_rate,
            retry_rate=retry_rate,
            unknown_field_rate=unknown_field_rate,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    records, expectation = plan_traffic(config)
    from consumer.simulate.publishing import publish_with_progress

    asyncio.run(publish_with_progress(settings, records, partitions))
    summary = expectation.to_json()
    if expect is not None:
        expect.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(
        f"published {summary['records']} records ({summary['duplicates']} duplicates, "
        f"{summary['dead_letters']} poison) to {settings.topic}; expect "
        f"{summary['messages']} messages, {summary['usage_rows']} usage rows, "
        f"cost {summary['total_cost_micros']} micros"
    )


@app.command()
def relay() -> None:
    """Publish pending usage revisions to the billing topic, alone (consume relays them too,
    unless LEDGER_RELAY=false)."""
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    from consumer.service import relay as run_relay

    asyncio.run(run_relay(settings))
