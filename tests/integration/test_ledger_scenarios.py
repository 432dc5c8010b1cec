"""The ledger's scenarios, driven through events into a real, migrated PostgreSQL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from consumer.commands.queries import read_ledger, usage_report
from consumer.ledger.batch import apply_events
from consumer.ledger.claims import BatchPlan, Outcome
from consumer.ledger.database import asyncpg_dsn
from producer.decoding import decode_event
from producer.events import UNATTRIBUTED, AnyEvent, RejectReason, TurnFinalized
from tests.examples import example
from tests.factories import (
    SPACE,
    THREAD,
    TURN,
    USER,
    appended,
    at,
    call,
    finalized,
    ledger_events,
    started,
)

TS = 1_795_684_502_118  # 2026-11-26T09:15:02.118Z, when the examples happened


async def apply(conn: asyncpg.Connection, *events: AnyEvent) -> BatchPlan:
    async with conn.transaction():
        return await apply_events(conn, ledger_events(events))


async def messages(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, thread_id, role, turn_id, content, author_id FROM chat_messages"
        " ORDER BY turn_id, role DESC, id"
    )
    return [{**dict(r), "content": json.loads(r["content"])} for r in rows]


async def usage_rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM token_usage ORDER BY id")
    return [dict(r) for r in rows]


async def test_shell_is_idempotent_and_keeps_its_id(ledger: asyncpg.Connection) -> None:
    event = started()
    await apply(ledger, event)
    first = await messages(ledger)
    plan = await apply(ledger, event)
    assert await messages(ledger) == first
    assert plan.outcomes == [Outcome.DUPLICATE]
    assistant = [m for m in first if m["role"] == "assistant"]
    assert [m["content"] for m in assistant] == [[{"type": "text", "text": ""}]]


async def test_user_turn_plus_shell_is_two_rows(ledger: asyncpg.Connection) -> None:
    await apply(ledger, started(query="hello"))
    rows = await messages(ledger)
    assert [(m["role"], m["turn_id"]) for m in rows] == [("user", TURN), ("assistant", TURN)]
    user = rows[0]
    assert user["content"] == [{"type": "text", "text": "hello"}]
    assert user["author_id"] == USER
    assert rows[1]["author_id"] is None
    thread = await ledger.fetchrow("SELECT * FROM chat_threads")
    assert (thread["id"], thread["search_space_id"], thread["created_by_id"]) == (
        THREAD,
        SPACE,
        USER,
    )


async def test_mentioned_documents_part_is_normalised(ledger: asyncpg.Connection) -> None:
    documents: list[dict[str, Any]] = [
        {"id": 11, "title": "Q3 report", "document_type": "FILE", "extra": "dropped"},
        {"id": 12, "title": "no type"},
        {"title": "no id", "document_type": "FILE"},
        {"id": 13, "document_type": "FILE"},
    ]
    await apply(ledger, started(query="hello", documents=documents))
    user = (await messages(ledger))[0]
    assert user["content"] == [
        {"type": "text", "text": "hello"},
        {
            "type": "mentioned-documents",
            "documents": [{"id": 11, "title": "Q3 report", "document_type": "FILE"}],
        },
    ]


async def test_no_surviving_document_means_no_part(ledger: asyncpg.Connection) -> None:
    await apply(ledger, started(query="a", documents=[], turn_id="t:1"))
    await apply(ledger, started(query="b", documents=[{"id": 1, "title": "x"}], turn_id="t:2"))
    users = [m["content"] for m in await messages(ledger) if m["role"] == "user"]
    assert users == [[{"type": "text", "text": "a"}], [{"type": "text", "text": "b"}]]


async def test_finalize_writes_content_and_one_usage_row(ledger: asyncpg.Connection) -> None:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "Revenue grew 12%"},
        {"type": "tool-call", "toolCallId": "c1", "args": {"q": "Q3"}, "result": {"hits": 3}},
    ]
    await apply(ledger, started(), finalized(content=content, calls=[call()]))
    assistant = [m for m in await messages(ledger) if m["role"] == "assistant"]
    assert [m["content"] for m in assistant] == [content]
    [usage] = await usage_rows(ledger)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        100,
        50,
        150,
    )
    assert usage["cost_micros"] == 12345
    assert (usage["thread_id"], usage["search_space_id"], usage["user_id"]) == (
        THREAD,
        SPACE,
        USER,
    )
    assert usage["message_id"] == assistant[0]["id"]
    assert usage["source"] == "turn.finalized"
    assert usage["usage_type"] == "chat"
    assert json.loads(usage["model_breakdown"]) == {
        "gpt-4o-mini": {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "total_tokens": 150,
            "cost_micros": 12345,
        }
    }
    assert json.loads(usage["call_details"]) == {"calls": [call().model_dump(exclude_unset=True)]}


async def test_usage_sums_calls_per_model(ledger: asyncpg.Connection) -> None:
    calls = [call(cost=10), call(cost=5), call("text-embedding-3-small", 40, 0, 40, 1, "embedding")]
    await apply(ledger, finalized(calls=calls))
    [usage] = await usage_rows(ledger)
    assert usage["cost_micros"] == 16
    assert usage["total_tokens"] == 340
    breakdown = json.loads(usage["model_breakdown"])
    assert breakdown["gpt-4o-mini"]["cost_micros"] == 15
    assert breakdown["text-embedding-3-small"]["prompt_tokens"] == 40


async def test_empty_content_stores_the_status_marker(ledger: asyncpg.Connection) -> None:
    await apply(ledger, started(), finalized(content=[]))
    assistant = [m for m in await messages(ledger) if m["role"] == "assistant"]
    assert assistant[0]["content"] == [{"type": "status", "text": "(no text response)"}]


async def test_two_finalizes_content_of_later_cost_of_first(ledger: asyncpg.Connection) -> None:
    first = finalized(content=[{"type": "text", "text": "first"}], calls=[call()], seconds=10)
    second = finalized(
        content=[{"type": "text", "text": "second"}], calls=[call(cost=99999)], seconds=20
    )
    await apply(ledger, started(), first)
    await apply(ledger, second)
    assistant = [m for m in await messages(ledger) if m["role"] == "assistant"]
    assert assistant[0]["content"] == [{"type": "text", "text": "second"}]
    assert [u["cost_micros"] for u in await usage_rows(ledger)] == [12345]


async def test_two_finalizes_in_reverse_arrival_give_the_same(ledger: asyncpg.Connection) -> None:
    first = finalized(content=[{"type": "text", "text": "first"}], calls=[call()], seconds=10)
    second = finalized(
        content=[{"type": "text", "text": "second"}], calls=[call(cost=99999)], seconds=20
    )
    await apply(ledger, second)
    plan = await apply(ledger, first, started())
    assistant = [m for m in await messages(ledger) if m["role"] == "assistant"]
    assert assistant[0]["content"] == [{"type": "text", "text": "second"}]
    assert [u["cost_micros"] for u in await usage_rows(ledger)] == [12345]
    assert plan.outcomes == [Outcome.APPLIED, Outcome.APPLIED]


async def test_legacy_append_after_finalize_keeps_server_cost(ledger: asyncpg.Connection) -> None:
    await apply(ledger, started(), finalized(calls=[call()]))
    plan = await apply(ledger, appended(cost=777, seconds=30))
    usage = await usage_rows(ledger)
    assert [(u["cost_micros"], u["source"]) for u in usage] == [(12345, "turn.finalized")]
    assert plan.outcomes == [Outcome.SUPERSEDED]
    assistant = [m for m in await messages(ledger) if m["role"] == "assistant"]
    assert assistant[0]["content"] == [{"type": "text", "text": "answer"}]


async def test_legacy_append_before_finalize_server_wins(ledger: asyncpg.Connection) -> None:
    await apply(ledger, started(), appended(cost=777, seconds=5))
    assert [u["cost_micros"] for u in await usage_rows(ledger)] == [777]
    plan = await apply(ledger, finalized(calls=[call()], seconds=10))
    usage = await usage_rows(ledger)
    assert [(u["cost_micros"], u["source"]) for u in usage] == [(12345, "turn.finalized")]
    assert plan.outcomes == [Outcome.APPLIED]
    assert [(c.model, c.cost_micros) for c in plan.usage_changes] == [("gpt-4o-mini", 12345 - 777)]


async def test_finalize_without_calls_neither_creates_nor_removes(
    ledger: asyncpg.Connection,
) -> None:
    await apply(ledger, finalized(calls=None, turn_id="t:1"))
    assert await usage_rows(ledger) == []
    await apply(ledger, appended(cost=5, turn_id="t:2"), finalized(calls=[], turn_id="t:2"))
    assert [u["cost_micros"] for u in await usage_rows(ledger)] == [5]


async def test_finalize_for_a_turn_never_started(ledger: asyncpg.Connection) -> None:
    await apply(ledger, finalized(calls=[call()]))
    rows = await messages(ledger)
    assert [(m["role"], m["content"]) for m in rows] == [
        ("assistant", [{"type": "text", "text": "answer"}])
    ]
    assert len(await usage_rows(ledger)) == 1
    await apply(ledger, started())  # the start arriving later only adds the user row
    rows = await messages(ledger)
    assert [(m["role"], m["content"][0]["text"]) for m in rows] == [
        ("user", "hello"),
        ("assistant", "answer"),
    ]


async def test_turnless_legacy_messages_are_keyed_by_event(ledger: asyncpg.Connection) -> None:
    one = appended(role="user", turn_id=None, content=[{"type": "text", "text": "a"}])
    two = appended(role="user", turn_id=None, content=[{"type": "text", "text": "a"}])
    paid = appended(role="assistant", turn_id=None, cost=42)
    await apply(ledger, one, two, paid)
    await apply(ledger, one, paid)  # redelivered
    rows = await messages(ledger)
    assert len(rows) == 3
    assert [u["cost_micros"] for u in await usage_rows(ledger)] == [42]


async def test_thread_registers(ledger: asyncpg.Connection) -> None:
    anonymous_first = started(user=None, seconds=-5, turn_id="t:0")
    await apply(ledger, finalized(seconds=50, calls=None))
    await apply(ledger, anonymous_first, started(seconds=1))
    thread = await ledger.fetchrow("SELECT * FROM chat_threads")
    assert thread["created_at"] == at(-5)
    assert thread["updated_at"] == at(50)
    # The earliest event WITH a user sets created_by_id (the anonymous one does not).
    assert thread["created_by_id"] == USER
    assert thread["created_by_at"] == at(1)


async def test_other_tenant_cannot_write_into_a_thread(ledger: asyncpg.Connection) -> None:
    await apply(ledger, started())
    intruder = finalized(space=SPACE + 1, content=[{"type": "text", "text": "mine now"}])
    plan = await apply(ledger, intruder, finalized(turn_id="t:2"))
    assert plan.outcomes == [Outcome.REJECTED, Outcome.APPLIED]
    texts = [m["content"][0]["text"] for m in await messages(ledger)]
    assert "mine now" not in texts


async def test_within_a_batch_the_first_space_seen_binds_the_thread(
    ledger: asyncpg.Connection,
) -> None:
    plan = await apply(
        ledger, started(space=1, thread_id=5), started(space=2, thread_id=5, turn_id="x")
    )
    assert plan.outcomes == [Outcome.APPLIED, Outcome.REJECTED]
    assert await ledger.fetchval("SELECT search_space_id FROM chat_threads WHERE id = 5") == 1


async def test_text_is_stored_exactly(ledger: asyncpg.Connection) -> None:
    texts = ["emoji 🚀👩‍👩‍👧", "'; DROP TABLE chat_messages; --", 'back\\slash "q"', "x" * 100_000]
    for i, text in enumerate(texts):
        await apply(ledger, started(query=text, turn_id=f"t:{i}"))
    stored = await ledger.fetch(
        "SELECT content->0->>'text' AS text FROM chat_messages WHERE role = 'user' ORDER BY turn_id"
    )
    assert [r["text"] for r in stored] == texts


# -- the contract's edge against the real database --------------------------------------------


async def test_loose_breakdowns_are_stored_as_sent_and_usage_by_model_adds_up(
    ledger: asyncpg.Connection,
) -> None:
    partial = appended(cost=333, turn_id="t:1", breakdown={"gpt-4o-mini": {"prompt_tokens": 4}})
    bare = appended(cost=500, turn_id="t:2", breakdown=None)
    empty = appended(cost=7, turn_id="t:3", breakdown={})
    plan = await apply(ledger, partial, bare, empty)
    stored = {
        r["turn_id"]: json.loads(r["model_breakdown"])
        for r in await ledger.fetch(
            "SELECT m.turn_id, u.model_breakdown FROM token_usage u"
            " JOIN chat_messages m ON m.id = u.message_id"
        )
    }
    assert stored == {"t:1": {"gpt-4o-mini": {"prompt_tokens": 4}}, "t:2": {}, "t:3": {}}
    by_model = {row["model"]: row for row in await usage_report(ledger, ["model"])}
    assert set(by_model) == {"gpt-4o-mini", UNATTRIBUTED}
    assert by_model[UNATTRIBUTED]["cost_micros"] == 333 + 500 + 7
    assert by_model["gpt-4o-mini"]["prompt_tokens"] == 4
    assert by_model[UNATTRIBUTED]["prompt_tokens"] == 3 * 10 - 4
    # The counters the consumer would move say the same, model by model.
    counted: dict[str, int] = {}
    for change in plan.usage_changes:
        counted[change.model] = counted.get(change.model, 0) + change.cost_micros
    assert counted == {UNATTRIBUTED: 840, "gpt-4o-mini": 0}


async def test_numbers_in_content_reach_the_database_digit_for_digit(
    ledger: asyncpg.Connection,
) -> None:
    value = json.dumps(
        {**example("turn.finalized"), "content": [{"type": "chart", "x": 1, "y": 2}]}
    )
    value = value.replace('"x": 1', '"x": 12345678901234567890.123').replace('"y": 2', '"y": 1e400')
    event = decode_event(value.encode(), timestamp_ms=TS)
    assert isinstance(event, TurnFinalized)
    await apply(ledger, event)
    stored = await ledger.fetchval(
        "SELECT content->0->>'x' FROM chat_messages WHERE role = 'assistant'"
    )
    assert stored == "12345678901234567890.123"
    assert await ledger.fetchval("SELECT (content->0->>'y')::numeric = 1e400 FROM chat_messages")


async def test_a_reused_event_id_for_another_turnless_message_is_an_event_id_conflict(
    ledger: asyncpg.Connection,
) -> None:
    event_id = uuid.uuid4()
    await apply(ledger, appended(role="user", turn_id=None, event_id=event_id))
    # A later batch: the same id as an assistant message with usage (this used to crash).
    plan = await apply(ledger, appended(role="assistant", turn_id=None, event_id=event_id, cost=9))
    assert plan.outcomes == [Outcome.REJECTED]
    assert plan.rejections[0].reason is RejectReason.EVENT_ID_CONFLICT
    assert await ledger.fetchval("SELECT count(*) FROM token_usage") == 0
    # In one batch: the later arrival is the one rejected, not silently counted a duplicate.
    other = uuid.uuid4()
    plan = await apply(
        ledger,
        appended(role="user", turn_id=None, event_id=other, thread_id=THREAD),
        appended(role="user", turn_id=None, event_id=other, thread_id=THREAD + 1, space=SPACE),
    )
    assert plan.outcomes == [Outcome.APPLIED, Outcome.REJECTED]
    assert plan.rejections[1].reason is RejectReason.EVENT_ID_CONFLICT


async def test_differing_copies_across_batches_give_the_in_batch_result(
    ledger_url: str,
) -> None:
    event = finalized(calls=[call(cost=100)], seconds=10)
    restamped = event.model_copy(update={"occurred_at": at(5)})
    other_payload = finalized(
        calls=[call(cost=999)], seconds=10, event_id=event.event_id, content=[]
    )
    copies = [event, restamped, other_payload]
    results = []
    for split in ([copies], [[c] for c in copies], [[c] for c in reversed(copies)]):
        conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
        try:
            await conn.execute("TRUNCATE token_usage, chat_messages, chat_threads")
            for batch in split:
                await apply(conn, *batch)
            results.append(await read_ledger(conn))
        finally:
            await conn.close()
    assert results[0] == results[1] == results[2]
    # Usage: the EARLIER occurred_at wins, so the re-stamped copy's cost is billed.
    assert next(iter(results[0].usage.values()))[5] == 100
