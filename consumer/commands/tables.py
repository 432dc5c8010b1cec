"""Operator tables (`dlq list`, `usage`): every value whole, in a terminal of any width and in a pipe.

rich lays a table out for the console's width and, by default, cuts what does not fit with
"…"; for a pipe it assumes 80 columns. Neither is acceptable for a dead letter's detail, a long
model name or a bill, so:

- In a terminal, cells fold: text wraps at spaces and a word longer than its column is broken
  over lines, never cut. Values are rich `Text`, never markup, so `model[beta]` stays as it is.
- Anywhere else (a pipe, a file): tab-separated values, a header line and one line per row,
  never wrapped, for `cut`, `sort` or a spreadsheet. A tab, newline, carriage return or
  backslash inside a value is escaped (`\\t`, `\\n`, `\\r`, `\\\\`, as in PostgreSQL's COPY
  text format), so one line is always one row.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from enum import StrEnum

from rich.console import Console
from rich.table import Table
from rich.text import Text

from producer import jsonvalues

TEXT_MIN = 8  # characters a text column keeps when numbers get their full width
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(value: object) -> str:
    return str(value).translate(_TSV_ESCAPES)


class ReportFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class ScreenFormat(StrEnum):
    """A command that reports one state (`verify`, `status`): a screen, or one JSON object."""

    table = "table"
    json = "json"


def print_rows(
    columns: Sequence[str],
    rows: Sequence[Mapping[str, object]],
    output: str,
    *,
    title: str,
    numeric: Collection[str] = (),
) -> None:
    """Rows in one of the report formats: `table` for people, `csv` (a header line, then one
    line per row) or `json` (one object per line, numbers exact) for jobs. A row marked
    `total` is the totals: `"total": true` in JSON, "total" in its first column in a table."""
    if output == "json":
        for row in rows:
            shown = {c: row[c] for c in columns}
            print(jsonvalues.dumps({**shown, "total": True} if row.get("total") else shown))
    elif output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
    else:
        cells = [
            [
                ("total" if i == 0 else "") if row.get("total") and row[c] is None else row[c]
                for i, c in enumerate(columns)
            ]
            for row in rows
        ]
        last_apart = bool(cells) and bool(rows[-1].get("total"))
        print_table(columns, cells, title=title, numeric=numeric, last_apart=last_apart)


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    console: Console | None = None,
    title: str | None = None,
    numeric: Collection[str] = (),
    row_lines: bool = False,
    last_apart: bool = False,
) -> None:
    """Print `rows` under `headers`: a folding table in a terminal, TSV otherwise.

    `numeric` columns are right-aligned in the terminal; `row_lines` separates rows whose
    cells are expected to wrap over several lines (e.g. a dead letter's detail); `last_apart`
    draws a line above the last row (a total).
    """
    console = console or Console()
    if not console.is_terminal:
        # Straight to the file: console.print would wrap long lines at the console's width.
        out = console.file
        out.write("\t".join(map(tsv_field, headers)) + "\n")
        for row in rows:
            out.write("\t".join(map(tsv_field, row)) + "\n")
        out.flush()
        return
    cells = [[str(value) for value in row] for row in rows]
    # `completion tokens` can wrap between its words where `completion_tokens` would fold.
    labels = [header.replace("_", " ") for header in headers]
    widths = _number_widths(labels, cells, [h in numeric for h in headers], console.width)
    table = Table(title=title, show_lines=row_lines)
    for label, header, width in zip(labels, headers, widths, strict=True):
        table.add_column(
            Text(label),
            overflow="fold",  # wrap, and break a word too long for the column; never cut
            justify="right" if header in numeric else "left",
            width=width,
        )
    for index, row in enumerate(cells):
        table.add_row(*map(Text, row), end_section=last_apart and index == len(cells) - 2)
    console.print(table)


def _number_widths(
    labels: Sequence[str], cells: Sequence[Sequence[str]], numeric: Sequence[bool], width: int
) -> list[int | None]:
    """Fixed widths that keep every number on one line, if the text columns can spare them.

    rich narrows the widest columns first and then all of them alike, which folds numbers
    (`1234567` over `123456`/`7`) while a model name has room to spare. A number broken over
    lines is easy to misread, so numeric columns get the width of their longest value (and
    of their label's longest word); the text columns share the rest, but keep at least
    TEXT_MIN characters each, or rich lays everything out (still folding, never cutting).
    """
    needed = [
        max([len(word) for word in label.split()] + [len(row[i]) for row in cells], default=0)
        for i, label in enumerate(labels)
    ]
    frame = 3 * len(labels) + 1  # a border and two spaces of padding per column, one more border
    fixed = sum(n for n, is_number in zip(needed, numeric, strict=True) if is_number)
    texts = sum(1 for is_number in numeric if not is_number)
    if frame + fixed + TEXT_MIN * texts > width:
        return [None] * len(labels)
    return [n if is_number else None for n, is_number in zip(needed, numeric, strict=True)]
