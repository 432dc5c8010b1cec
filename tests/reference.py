"""A plainly written reference of the merge rules, independent of consumer/ledger/merge.py.

It looks at the whole set of events at once and picks each winner with max/min over sort
keys, which is how docs/contract.md#merge-rules states the rules. Only the thread's search space and the
owner of a turn-less message's event_id depend on arrival order (the first accepted event
binds them). Exact copies (event_id, occurred_at, payload digest) count once; differing copies
of one event_id all compete, ordered by their digest last.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from consumer.ledger.claims import Claim, MessageKey
from consumer.ledger.rebuild import LedgerRows
from producer import jsonvalues
from producer.events import AnyEvent, MessageAppended, TurnFinalized, TurnStarted

FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")


def payload_digest(event: AnyEvent) -> bytes:
    """The digest as every release before the compiled paths wrote it (pure-Python JSON): the
    native one must give the same bytes, or a redelivery after an upgrade would compete as a
    differing copy."""
    text = jsonvalues.dumps(event.model_dump(exclude_unset=True), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).digest()


def reference_rows(events: Sequence[AnyEvent]) -> LedgerRows:
    space_of: dict[int, int] = {}
    turnless_owner: dict[uuid.UUID, tuple[int, str]] = {}
    accepted: dict[tuple[uuid.UUID, Any, bytes], tuple[AnyEvent, bytes]] = {}
    for event in events:
        if space_of.get(event.thread_id, event.search_space_id) != event.search_space_id:
            continue
        if isinstance(event, MessageAppended) and event.turn_id is None:
            owner = (event.thread_id, event.role)
            if turnless_owner.setdefault(event.event_id, owner) != owner:
                continue
        space_of.setdefault(event.thread_id, event.search_space_id)
        digest = payload_digest(event)
        accepted.setdefault((event.event_id, event.occurred_at, digest), (event, digest))

    by_thread: dict[int, list[AnyEvent]] = defaultdict(list)
    content_claims: dict[MessageKey, list[tuple[Claim, Any, Any]]] = defaultdict(list)
    touched_at: dict[MessageKey, list[Any]] = defaultdict(list)
    usage_claims: dict[MessageKey, list[tuple[Claim, tuple[Any, ...]]]] = defaultdict(list)

    creator_claims: dict[int, list[tuple[Any, uuid.UUID, bytes, uuid.UUID]]] = defaultdict(list)
    for e, d in accepted.values():
        by_thread[e.thread_id].append(e)
        if e.user_id is not None:
            creator_claims[e.thread_id].append((e.occurred_at, e.event_id, d, e.user_id))
        if isinstance(e, TurnStarted):
            user = MessageKey(e.thread_id, "user", e.turn_id, None)
            shell = MessageKey(e.thread_id, "assistant", e.turn_id, None)
            content: list[dict[str, Any]] = [{"type": "text", "text": e.user_query}]
            docs = [
                {"id": d["id"], "title": d["title"], "document_type": d["document_type"]}
                for d in e.mentioned_documents
                if d.get("id") is not None
                and d.get("title") is not None
                and d.get("document_type") is not None
            ]
            if docs:
                content.append({"type": "mentioned-documents", "documents": docs})
            content_claims[user].append(
                (Claim(2, e.occurred_at, e.event_id, d), content, e.user_id)
            )
            content_claims[shell].append(
                (Claim(0, e.occurred_at, e.event_id, d), [{"type": "text", "text": ""}], None)
            )
            touched_at[user].append(e.occurred_at)
            touched_at[shell].append(e.occurred_at)
        elif isinstance(e, TurnFinalized):
            key = MessageKey(e.thread_id, "assistant", e.turn_id, None)
            body = [p.model_dump() for p in e.content] or [
                {"type": "status", "text": "(no text response)"}
            ]
            content_claims[key].append((Claim(2, e.occurred_at, e.event_id, d), body, None))
            touched_at[key].append(e.occurred_at)
            calls = e.usage.calls if e.usage else []
            if calls:
                breakdown: dict[str, dict[str, int]] = {}
                for c in calls:
                    m = breakdown.setdefault(c.model, dict.fromkeys(FIELDS, 0))
                    for f in FIELDS:
                        m[f] += getattr(c, f)
                    for kind in ("cached_tokens", "reasoning_tokens"):
                        if getattr(c, kind) is not None:
                            m[kind] = m.get(kind, 0) + getattr(c, kind)
                totals = tuple(sum(getattr(c, f) for c in calls) for f in FIELDS)
                values = (
                    "turn.finalized",
                    *totals,
                    breakdown,
                    {"calls": [c.model_dump(exclude_unset=True) for c in calls]},
                    e.search_space_id,
                    e.user_id,
                )
                usage_claims[key].append((Claim(2, e.occurred_at, e.event_id, d), values))
        elif isinstance(e, MessageAppended):
            origin = e.event_id if e.turn_id is None else None
            key = MessageKey(e.thread_id, e.role, e.turn_id, origin)
            author = e.user_id if e.role == "user" else None
            body = [p.model_dump() for p in e.content]
            content_claims[key].append((Claim(1, e.occurred_at, e.event_id, d), body, author))
            touched_at[key].append(e.occurred_at)
            if e.token_usage is not None:
                t = e.token_usage
                details = t.call_details
                values = (
                    "message.appended",
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.total_tokens,
                    t.cost_micros,
                    {
                        model: u.model_dump(exclude_unset=True)
                        for model, u in (t.usage or {}).items()
                    },
                    {"calls": []}
                    if details is None
                    else {"calls": details}
                    if isinstance(details, list)
                    else details,
                    e.search_space_id,
                    e.user_id,
                )
                usage_claims[key].append((Claim(1, e.occurred_at, e.event_id, d), values))

    threads = {}
    for thread_id, evs in by_thread.items():
        creators = creator_claims[thread_id]
        creator = min(creators)[3] if creators else None
        threads[thread_id] = (
            space_of[thread_id],
            creator,
            min(e.occurred_at for e in evs),
            max(e.occurred_at for e in evs),
        )

    messages = {}
    for key, claims in content_claims.items():
        claim, body, author = max(claims, key=lambda c: c[0])
        messages[key] = (body, author, claim, min(touched_at[key]))

    usage = {}
    for key, paid in usage_claims.items():
        # Highest rank; on a tie the EARLIEST (occurred_at, event_id, digest).
        claim, values = min(paid, key=lambda c: (-c[0].rank, c[0].at, c[0].event_id, c[0].digest))
        source, *rest = values
        usage[key] = (source, claim, *rest, min(c[0].at for c in paid))
    return LedgerRows(threads=threads, messages=messages, usage=usage)
