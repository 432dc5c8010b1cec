"""`dlq list` and `usage` as an operator runs them, against a real ledger and dead-letter topic:
in a pipe, tab-separated lines with whole values; in an 80-column terminal, the same values,
folded over lines but never cut."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

from producer.client import (
    TurnEventProducer,
    UsageAccumulator,
    message_appended_event,
    turn_finalized_event,
    turn_started_event,
)
from tests.integration.harness import REPO, ConsumerProcess, Stack
from tests.tables import plain, squeeze, terminal_rows

LONG_MODEL = "anthropic/claude-3-7-sonnet-20250219[beta]-extended-thinking-preview"
# Many schema errors at once: the longest details the consumer writes.
BROKEN = {
    "type": "turn.finalized",
    "schema_version": 1,
    "event_id": "not-a-uuid",
    "occurred_at": "yesterday",
    "thread_id": -1,
    "search_space_id": 0,
    "user_id": "nobody",
    "turn_id": "x" * 80,
    "content": [1, {"type": 3}],
}


def _cli(stack: Stack, *args: str, terminal: bool) -> subprocess.CompletedProcess[str]:
    # rich decides by these what a terminal is and how wide; capture_output is a pipe.
    extra = {"TTY_COMPATIBLE": "1", "COLUMNS": "80", "NO_COLOR": "1"} if terminal else {}
    env = stack.env(**extra)
    if not terminal:
        env = {k: v for k, v in env.items() if k not in {"TTY_COMPATIBLE", "FORCE_COLOR"}}
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


async def _publish(stack: Stack) -> None:
    user = uuid.uuid4()
    usage = UsageAccumulator()
    usage.add(LONG_MODEL, 987654321, 123456789, 1111111110, 9876543210987)
    await stack.create_topic()
    async with TurnEventProducer(stack.bootstrap, topic=stack.topic) as producer:
        await producer.publish(
            turn_started_event(
                thread_id=4242,
                search_space_id=7,
                user_id=user,
                turn_id="4242:1",
                user_query="Summarise the Q3 report",
            )
        )
        await producer.publish(
            turn_finalized_event(
                thread_id=4242,
                search_space_id=7,
                user_id=user,
                turn_id="4242:1",
                content=[{"type": "text", "text": "+12%"}],
                usage=usage,
            )
        )
        # The same thread under another search space: thread_search_space_mismatch.
        await producer.publish(
            message_appended_event(
                thread_id=4242,
                search_space_id=8,
                user_id=user,
                role="user",
                content=[{"type": "text", "text": "hi"}],
            )
        )
        await producer.send_and_wait(stack.topic, json.dumps(BROKEN).encode(), key=b"4242")


async def test_dlq_list_and_usage_in_a_pipe_and_in_an_80_column_terminal(
    kafka_bootstrap: str, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url, partitions=1)
    await _publish(stack)
    consumer = ConsumerProcess(stack.env(), tmp_path / "consumer.log", "--until-idle").start()
    try:
        assert consumer.wait() == 0, consumer.logs()
    finally:
        consumer.stop_quietly()

    listed = _cli(stack, "dlq", "list", terminal=False)
    header, *letters = listed.stdout.splitlines()
    assert header.split("\t") == ["dlq offset", "reason", "source", "failed at", "bytes", "detail"]
    assert all(len(row.split("\t")) == 6 for row in letters)  # rows only: the count is apart
    assert listed.stderr.splitlines()[-1] == "2 dead letter(s)"
    # Sorted by source offset: a record that cannot be decoded is dead-lettered before the
    # batch's transaction, one the database rejects after it.
    rows = sorted((line.split("\t") for line in letters), key=lambda row: row[2])
    assert [row[1] for row in rows] == ["thread_search_space_mismatch", "schema_invalid"]
    assert [row[2] for row in rows] == [f"{stack.topic}[0]@2", f"{stack.topic}[0]@3"]
    for row in rows:
        assert datetime.fromisoformat(row[3]).tzinfo is not None
        assert int(row[4]) > 0
    assert len(rows[1][5]) > 200 and rows[1][5].endswith("more")  # the whole detail

    shown = _cli(stack, "dlq", "list", terminal=True).stdout
    assert "…" not in shown and max(map(len, plain(shown).splitlines())) <= 80
    shown_rows = sorted(terminal_rows(shown), key=lambda row: squeeze(row[2]))
    assert [[squeeze(cell) for cell in row] for row in shown_rows] == [
        [squeeze(cell) for cell in row] for row in rows
    ]

    by = ("--by", "user", "--by", "model")
    piped = _cli(stack, "usage", *by, terminal=False).stdout.splitlines()
    assert piped[0].split("\t") == [
        "user",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_micros",
        "cached_tokens",
        "reasoning_tokens",
        "usage_rows",
    ]
    usage, total = [line.split("\t") for line in piped[1:]]
    assert total == ["total", "", *usage[2:]]  # one usage row: the total is that row
    assert usage[1:] == [
        LONG_MODEL,
        "987654321",
        "123456789",
        "1111111110",
        "9876543210987",
        "0",  # the legacy breakdown reports no token kinds
        "0",
        "1",
    ]

    shown = _cli(stack, "usage", *by, terminal=True).stdout
    assert "…" not in shown and max(map(len, plain(shown).splitlines())) <= 80
    assert "token usage" in shown
    assert [[squeeze(cell) for cell in row] for row in terminal_rows(shown)] == [usage, total]
