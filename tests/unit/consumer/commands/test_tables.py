"""Operator tables (`dlq list`, `usage`) keep every value whole: in an 80-column terminal the
cells fold, in a pipe the rows are tab-separated lines."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from consumer.cli import dead_letters as dlq_cli
from consumer.commands.dead_letters import DeadLetterView
from consumer.commands.tables import print_table
from producer.events import USAGE_MEASURES
from tests.tables import plain, squeeze, terminal_rows

DLQ_HEADERS = ["dlq offset", "reason", "source", "failed at", "bytes", "detail"]
USAGE_HEADERS = ["user", "model", *USAGE_MEASURES, "usage_rows"]
NUMERIC = {*USAGE_MEASURES, "usage_rows"}

LONG_DETAIL = (
    "content.0: Input should be a valid dictionary (type=dict_type); turn_id: String should "
    "have at most 64 characters (max_length=64); "
) * 9  # about 1 KiB, the header's limit
VIEWS = [
    DeadLetterView(
        partition=0,
        offset=123456789,
        reason="thread_search_space_mismatch",
        detail=LONG_DETAIL[:1024],
        source="billing-team.chat.turn-events.v2[11]@9223372036854775806",
        failed_at="2026-11-26T09:15:02.118+00:00",
        size=1048576,
    ),
    DeadLetterView(0, 123456790, "invalid_json", "line 1 column 2 (char 1)", "t[0]@7", "", 9),
]
USAGE_ROWS: list[list[object]] = [
    [
        "0b6f3c1e-2f44-4d8e-9a77-3f1c2e5d9b10",
        "anthropic/claude-3-7-sonnet-20250219[beta]-extended-thinking-preview",
        9223372036854775807,
        123456789012345,
        9223372036854775807,
        98765432109876543,
        1234567,
    ],
    ["(none)", "(unattributed)", 0, 0, 1, 1, 1],
]


def _dlq_values(view: DeadLetterView) -> list[str]:
    return [
        f"{view.partition}:{view.offset}",
        view.reason,
        view.source,
        view.failed_at,
        str(view.size),
        view.detail,
    ]


def _terminal(width: int = 80) -> Console:
    return Console(width=width, force_terminal=True, color_system=None, file=io.StringIO())


def _output(console: Console) -> str:
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def _assert_whole(rendered: str, expected: list[list[str]], width: int = 80) -> None:
    text = plain(rendered)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    rows = terminal_rows(rendered)
    assert len(rows) == len(expected)
    for row, values in zip(rows, expected, strict=True):
        assert [squeeze(cell) for cell in row] == [squeeze(value) for value in values]


def test_dlq_list_in_an_80_column_terminal_folds_every_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command's own code path, with rich believing it writes to an 80-column terminal.
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    dlq_cli.print_dead_letters(VIEWS)
    rendered = capsys.readouterr().out
    _assert_whole(rendered, [_dlq_values(view) for view in VIEWS])
    assert "dlq offset" in plain(rendered)


def test_dlq_list_in_a_pipe_is_one_tab_separated_line_per_dead_letter(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    dlq_cli.print_dead_letters(VIEWS)  # capsys is not a terminal, as a pipe is not
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t") for line in lines] == [
        DLQ_HEADERS,
        *(_dlq_values(view) for view in VIEWS),
    ]


@pytest.mark.parametrize("row", range(len(USAGE_ROWS)))
def test_usage_in_an_80_column_terminal_cuts_no_model_name_or_number(row: int) -> None:
    console = _terminal()
    print_table(USAGE_HEADERS, [USAGE_ROWS[row]], console=console, numeric=NUMERIC)
    _assert_whole(_output(console), [[str(v) for v in USAGE_ROWS[row]]])


def test_usage_numbers_stay_on_one_line_when_the_text_columns_can_spare_the_room() -> None:
    rows: list[list[object]] = [
        [7, "gpt-4o-mini", 1234567, 98765, 1333332, 405123, 42],
        [12, "text-embedding-3-small-with-a-longer-name", 1, 2, 3, 4, 5],
    ]
    headers = ["space", "model", *USAGE_MEASURES, "usage_rows"]
    console = _terminal()
    print_table(headers, rows, console=console, numeric=NUMERIC)
    rendered = plain(_output(console))
    first = next(line for line in rendered.splitlines() if "1234567" in line)
    for number in ("1234567", "98765", "1333332", "405123", "42"):
        assert f" {number} │" in first
    assert "completion" in rendered  # a label wraps between its words
    for row in rows:  # and row by row, nothing is cut
        single = _terminal()
        print_table(headers, [row], console=single, numeric=NUMERIC)
        _assert_whole(_output(single), [[str(v) for v in row]])


def test_a_pipe_gets_whole_values_and_one_line_per_row_whatever_they_contain() -> None:
    pipe = Console(file=io.StringIO(), width=80)  # rich would lay a table out for 80 columns
    awkward = "a\tb\nc\\d\re"
    print_table(USAGE_HEADERS, [*USAGE_ROWS, ["u", awkward, 1, 2, 3, 4, 5]], console=pipe)
    lines = _output(pipe).splitlines()
    assert lines[0].split("\t") == USAGE_HEADERS
    assert [line.split("\t") for line in lines[1:3]] == [[str(v) for v in r] for r in USAGE_ROWS]
    assert lines[3].split("\t")[1] == "a\\tb\\nc\\\\d\\re"
    assert len(lines) == 4


def test_values_are_text_never_markup() -> None:
    console = _terminal()
    print_table(["model"], [["acme[bold]/llm[/bold][beta]"]], console=console)
    assert terminal_rows(_output(console)) == [["acme[bold]/llm[/bold][beta]"]]
