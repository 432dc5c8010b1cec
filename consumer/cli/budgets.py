"""`budget set|list|delete`: budgets and spend alerts (docs/operations.md#budgets)."""

from __future__ import annotations

import asyncio
import uuid
from enum import StrEnum
from typing import Annotated

import typer

from consumer.billing.budget_rules import DEFAULT_THRESHOLDS, check_limits, parse_thresholds
from consumer.cli.app import app, settings_or_exit
from consumer.commands.tables import ScreenFormat, print_rows
from consumer.failures import ExitCode, fatal_line
from producer.events import MAX_INT64

budget_app = typer.Typer(
    help="Set, list and delete budgets of a search space.", no_args_is_help=True
)
app.add_typer(budget_app, name="budget")

LIST_COLUMNS = (
    "id",
    "search_space_id",
    "user_id",
    "period",
    "period_start",
    "cost_micros_limit",
    "total_tokens_limit",
    "thresholds",
    "cost_micros",
    "total_tokens",
    "crossed",
)
NUMERIC = {
    "id",
    "search_space_id",
    "cost_micros_limit",
    "total_tokens_limit",
    "cost_micros",
    "total_tokens",
}


class PeriodChoice(StrEnum):
    day = "day"
    month = "month"
    total = "total"


def _refuse(line: str) -> typer.Exit:
    fatal_line(line, ExitCode.CONFIGURATION)
    return typer.Exit(ExitCode.CONFIGURATION)


@budget_app.command("set")
def set_budget(
    space: Annotated[int, typer.Option(help="the search space")],
    period: Annotated[PeriodChoice, typer.Option(help="UTC calendar day, month, or all time")],
    user: Annotated[uuid.UUID | None, typer.Option(help="one user of the space only")] = None,
    cost_micros: Annotated[int | None, typer.Option(help="limit on cost, in micros")] = None,
    tokens: Annotated[int | None, typer.Option(help="limit on total tokens")] = None,
    thresholds: Annotated[
        str, typer.Option(help="percents of the limit that alert, 1 .. 1000")
    ] = ",".join(map(str, DEFAULT_THRESHOLDS)),
) -> None:
    """Create or update the budget of a scope and period (the limits given replace the old
    ones), judge its current period at once, and print its id."""
    if not 1 <= space <= MAX_INT64:
        raise _refuse(f"budget set: --space {space}: a search space id is 1 .. {MAX_INT64}")
    try:
        check_limits(cost_micros, tokens)
        percents = parse_thresholds(thresholds)
    except ValueError as error:
        raise _refuse(f"budget set: {error}") from None
    settings = settings_or_exit()
    from consumer.commands.budgets import BudgetChange, BudgetRefusedError, run_set

    change = BudgetChange(space, user, period.value, cost_micros, tokens, percents)
    try:
        budget_id = asyncio.run(run_set(settings, change))
    except BudgetRefusedError as refused:
        raise _refuse(str(refused)) from None
    typer.echo(budget_id)


@budget_app.command("list")
def list_budgets(
    space: Annotated[int | None, typer.Option(help="only this search space")] = None,
    output: Annotated[
        ScreenFormat,
        typer.Option("--format", help="table for people; json (one object per line) for jobs"),
    ] = ScreenFormat.table,
) -> None:
    """Every budget: limits, thresholds, its current period's spend and the thresholds crossed
    in it (as measure:percent)."""
    if space is not None and not 1 <= space <= MAX_INT64:
        raise _refuse(f"budget list: --space {space}: a search space id is 1 .. {MAX_INT64}")
    settings = settings_or_exit()
    from consumer.commands.budgets import run_list

    rows = asyncio.run(run_list(settings, space))
    if output is ScreenFormat.table:
        rows = [
            {
                **row,
                "user_id": row["user_id"] or "",
                "cost_micros_limit": row["cost_micros_limit"] or "",
                "total_tokens_limit": row["total_tokens_limit"] or "",
                "thresholds": ",".join(map(str, row["thresholds"])),
                "crossed": ", ".join(row["crossed"]),
            }
            for row in rows
        ]
    print_rows(LIST_COLUMNS, rows, output.value, title="budgets", numeric=NUMERIC)


@budget_app.command("delete")
def delete_budget(budget_id: Annotated[int, typer.Argument(help="the budget's id")]) -> None:
    """Delete a budget and its states (alerts already written are still published)."""
    if not 1 <= budget_id <= MAX_INT64:
        raise _refuse(f"budget delete: {budget_id}: a budget id is 1 .. {MAX_INT64}")
    settings = settings_or_exit()
    from consumer.commands.budgets import run_delete

    if not asyncio.run(run_delete(settings, budget_id)):
        raise _refuse(f"budget delete: no budget {budget_id} (see budget list)")
    typer.echo(f"budget {budget_id} deleted")
