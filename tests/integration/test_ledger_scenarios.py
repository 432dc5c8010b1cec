"""The ledger's scenarios, driven through events into a real, migrated PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from consumer.merge import BatchPlan, Outcome
from consumer.store import apply_events
from producer.events import AnyEvent
from tests.factories import SPACE, THREAD, TURN, USER, appended, at, call, finalized, started


async def apply(conn: asyncpg.Connection, *events: AnyEvent) -> BatchPlan:
    async with conn.transaction():
        return await apply_events(conn, list(events))


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
    assert json.loads(usage["call_details"]) == {"calls": [call().model_dump()]}


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
