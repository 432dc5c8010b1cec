"""What `verify` and `status` print: a screen for people, or one JSON object with the same
figures for jobs (docs/operations.md#verify-coverage, docs/operations.md#status)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from consumer.commands.group_status import GroupStatus
from consumer.commands.tables import print_table
from consumer.commands.verify import VerifyReport
from producer import jsonvalues

SHOWN_DIFFERENCES = 50  # on the screen; the JSON carries every one verify kept


def verify_verdict(report: VerifyReport) -> str:
    """The line verify ends on: what was compared, and how it came out."""
    if not report.ok:
        compared = (
            f" (compared up to the applied offsets; {_not_applied(report)})"
            if report.not_applied
            else ""
        )
        return f"{report.difference_count} difference(s){compared}"
    if report.nothing_to_compare:
        return "nothing to compare: the topic has no committed record and the ledger no row"
    if report.not_applied:
        return f"ledger matches the topic up to the applied offsets; {_not_applied(report)}"
    return "ledger matches the topic"


def _not_applied(report: VerifyReport) -> str:
    behind = ", ".join(
        f"partition {c.partition}: {c.not_applied}" for c in report.coverage if c.not_applied
    )
    return f"{report.not_applied} record(s) not applied yet ({behind})"


def print_verify(report: VerifyReport) -> None:
    console = Console()
    table = Table("", "expected", "in the ledger", title="verify")
    for name in report.expected:
        style = "" if report.expected[name] == report.actual.get(name) else "red"
        table.add_row(name, str(report.expected[name]), str(report.actual.get(name)), style=style)
    console.print(table)
    coverage = Table("partition", "compared up to", "log end", "not applied", title="coverage")
    for c in report.coverage:
        coverage.add_row(*map(str, (c.partition, c.applied, c.log_end, c.not_applied)))
    console.print(coverage)
    console.print(f"records read: {report.records_read} (skipped, never applied: {report.skipped})")
    for difference in report.differences[:SHOWN_DIFFERENCES]:
        console.print(
            Text(f"  {difference.table}: {difference.key}: {difference.problem}"), soft_wrap=True
        )
    if report.difference_count > SHOWN_DIFFERENCES:
        console.print(f"  ... and {report.difference_count - SHOWN_DIFFERENCES} more")
    if report.unreadable:
        console.print(
            Text(
                "stopped comparing: the ledger holds a value PostgreSQL cannot print"
                f" ({report.unreadable})",
                style="red",
            ),
            soft_wrap=True,
        )
    # soft_wrap: the verdict is one line however long, in a pipe too (rich assumes 80 columns)
    console.print(
        Text(verify_verdict(report), style="green" if report.ok else "red"), soft_wrap=True
    )


def verify_json(report: VerifyReport) -> str:
    return jsonvalues.dumps(
        {
            "ok": report.ok,
            "verdict": verify_verdict(report),
            "expected": report.expected,
            "actual": report.actual,
            "records_read": report.records_read,
            "skipped": report.skipped,
            "not_applied": report.not_applied,
            "partitions": [
                {
                    "partition": c.partition,
                    "compared_up_to": c.applied,
                    "log_end": c.log_end,
                    "not_applied": c.not_applied,
                }
                for c in report.coverage
            ],
            "differences": report.difference_count,
            "differences_kept": [
                {"table": d.table, "key": d.key, "problem": d.problem} for d in report.differences
            ],
            "unreadable": report.unreadable,
        }
    )


def _optional(value: object) -> str:
    return "-" if value is None else str(value)


def print_status(status: GroupStatus) -> None:
    console = Console()
    console.print(Text(f"group {status.group_id}, topic {status.topic}"))
    print_table(
        ["partition", "stored", "log end", "last stable", "lag", "stopped"],
        [
            [
                p.partition,
                _optional(p.stored),
                p.high_watermark,
                p.last_stable,
                p.lag,
                _optional(p.halted),
            ]
            for p in status.partitions
        ],
        console=console,
        numeric={"partition", "stored", "log end", "last stable", "lag"},
    )
    if status.members_error is not None:
        console.print(Text(f"members: unknown ({status.members_error})"))
    else:
        console.print(Text(f"members: {len(status.members)} (group {status.state})"))
        for m in status.members:
            owns = ", ".join(map(str, m.partitions)) or "none"
            console.print(Text(f"  {m.client_id} on {m.host}: partitions {owns} ({m.member_id})"))
    if status.halted:
        console.print(Text(f"{len(status.halted)} partition(s) stopped", style="red"))


def status_json(status: GroupStatus) -> str:
    partitions: list[dict[str, Any]] = [
        {
            "partition": p.partition,
            "stored_offset": p.stored,
            "high_watermark": p.high_watermark,
            "last_stable_offset": p.last_stable,
            "log_start": p.log_start,
            "lag": p.lag,
            "halted": p.halted is not None,
            "halt_reason": p.halted,
            "halted_at": p.halted_at,
        }
        for p in status.partitions
    ]
    return jsonvalues.dumps(
        {
            "ok": status.ok,
            "group_id": status.group_id,
            "topic": status.topic,
            "partitions": partitions,
            "lag": sum(p.lag for p in status.partitions),
            "group_state": status.state,
            "members": None
            if status.members_error is not None
            else [
                {
                    "member_id": m.member_id,
                    "client_id": m.client_id,
                    "host": m.host,
                    "partitions": m.partitions,
                }
                for m in status.members
            ],
            "members_error": status.members_error,
        }
    )
