"""Reading back what `consumer.commands.tables.print_table` printed, to prove that no value was cut."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(rendered: str) -> str:
    """The text of a terminal rendering without its colour and style escapes."""
    return _ANSI.sub("", rendered)


def squeeze(text: str) -> str:
    """Text without whitespace: folding moves line breaks, never the characters between them."""
    return "".join(text.split())


def terminal_rows(rendered: str) -> list[list[str]]:
    """The body cells of a rich table as printed, each cell's lines joined with spaces.

    Body lines are the ones with a light vertical bar (the header's are heavy); a row ends at
    a row separator (├) or the bottom border (└), so a table without row lines reads as one
    row: render those one row at a time.
    """
    rows: list[list[str]] = []
    current: list[list[str]] | None = None
    for line in plain(rendered).splitlines():
        stripped = line.strip()
        if "│" in stripped:
            parts = stripped.split("│")[1:-1]
            if current is None:
                current = [[] for _ in parts]
            for cell, part in zip(current, parts, strict=True):
                cell.append(part.strip())
        elif current is not None and stripped.startswith(("├", "└")):
            rows.append([" ".join(cell).strip() for cell in current])
            current = None
    return rows
