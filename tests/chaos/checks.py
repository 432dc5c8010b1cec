"""After the drain: the ledger against the simulator's expectation (every message's content and
usage, the totals per model), the dead-letter topic against the poison that was published
(by source position, each reason right), and the secrets nowhere they must not be.

Each check returns a list of failures (empty: it holds). Failures name rows and positions,
never content: content carries the canary chat text."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.simulate.expectation import Expectation, ExpectedRow, RowKey, row_key
from producer.events import RejectReason
from tests.integration.harness import Stack, expected_summary, ledger_summary

_ROWS = """
SELECT m.thread_id, m.turn_id, m.role, m.content_event_id, m.content::text AS content,
       u.source, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost_micros
FROM chat_messages m LEFT JOIN token_usage u ON u.message_id = m.id
"""


async def check_ledger(stack: Stack, expect: Expectation) -> list[str]:
    conn = await stack.connect()
    try:
        rows = await conn.fetch(_ROWS)
        orphans = await conn.fetchval("SELECT count(*) FROM token_usage WHERE message_id IS NULL")
    finally:
        await conn.close()
    stored: dict[RowKey, ExpectedRow] = {}
    for row in rows:
        key = row_key(row["thread_id"], row["turn_id"], row["role"], row["content_event_id"])
        claim = None
        if row["source"] is not None:
            claim = (
                row["source"],
                row["prompt_tokens"],
                row["completion_tokens"],
                row["total_tokens"],
                row["cost_micros"],
            )
        stored[key] = ExpectedRow(json.loads(row["content"]), claim)
    failures = []
    missing, extra = expect.rows.keys() - stored.keys(), stored.keys() - expect.rows.keys()
    if missing or extra:
        failures.append(
            f"messages: {len(missing)} missing {sorted(missing)[:3]}, {len(extra)} extra {sorted(extra)[:3]}"
        )
    content = [
        k for k in expect.rows.keys() & stored.keys() if stored[k].content != expect.rows[k].content
    ]
    usage = [
        k for k in expect.rows.keys() & stored.keys() if stored[k].usage != expect.rows[k].usage
    ]
    if content:
        failures.append(f"content differs in {len(content)} messages, e.g. {sorted(content)[:3]}")
    if usage:
        failures.append(f"usage differs in {len(usage)} messages, e.g. {sorted(usage)[:3]}")
    if orphans:
        failures.append(f"{orphans} usage rows without a message")
    summary, wanted = await ledger_summary(stack), expected_summary(expect)
    if summary != wanted:
        different = [name for name in wanted if summary[name] != wanted[name]]
        failures.append(f"summary differs in {different}: {summary} != {wanted}")
    return failures


async def read_topic(stack: Stack, topic: str, partitions: int) -> list[Any]:
    """Every committed record of `topic` (plain listener, read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for part in batch.values():
                records += part
        return records
    finally:
        await consumer.stop()


async def check_dead_letters(
    stack: Stack, reasons: dict[bytes, RejectReason]
) -> tuple[list[str], dict[str, Any]]:
    """The dead-letter topic holds exactly the poison published (every position in the source
    topic whose value is a poison value, each with its reason and its bytes); dead letters
    are at-least-once, so repeats of one source position are allowed and counted."""
    source = await read_topic(stack, stack.topic, stack.partitions)
    wanted = {
        (r.partition, r.offset): (reasons[r.value or b""], r.value or b"")
        for r in source
        if (r.value or b"") in reasons
    }
    letters = await read_topic(stack, stack.dlq_topic, 1)
    got: dict[tuple[int, int], tuple[RejectReason | str, bytes]] = {}
    failures: list[str] = []
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        if headers.get("ledger.source.topic") != stack.topic:
            failures.append(f"a dead letter from {headers.get('ledger.source.topic')!r}")
            continue
        position = (int(headers["ledger.source.partition"]), int(headers["ledger.source.offset"]))
        got[position] = (headers["ledger.error.reason"], letter.value or b"")
    missing = sorted(wanted.keys() - got.keys())
    unexpected = sorted(got.keys() - wanted.keys())
    if missing:
        failures.append(f"{len(missing)} poison records not dead-lettered, e.g. {missing[:5]}")
    if unexpected:
        failures.append(f"{len(unexpected)} dead letters of good records, e.g. {unexpected[:5]}")
    wrong = [p for p in wanted.keys() & got.keys() if got[p][0] != wanted[p][0].value]
    if wrong:
        sample = [(p, got[p][0], wanted[p][0].value) for p in sorted(wrong)[:5]]
        failures.append(f"{len(wrong)} dead letters with the wrong reason: {sample}")
    altered = [p for p in wanted.keys() & got.keys() if got[p][1] != wanted[p][1]]
    if altered:
        failures.append(f"{len(altered)} dead letters whose value is not the original bytes")
    by_reason = Counter(str(reason) for reason, _ in got.values())
    report = {
        "dead_letters": len(got),
        "dead_letter_records": len(letters),  # repeats included (at-least-once)
        "dead_letters_by_reason": dict(sorted(by_reason.items())),
        "poison_published": len(wanted),
        "_letters": letters,
    }
    return failures, report


def check_secrets(texts: dict[str, str], secrets: dict[str, str]) -> list[str]:
    return [
        f"{what} in {where}"
        for where, text in texts.items()
        for what, secret in secrets.items()
        if secret in text
    ]


def dead_letter_headers(letters: list[Any]) -> str:
    return "\n".join(f"{k}={v.decode(errors='replace')}" for r in letters for k, v in r.headers)
