"""The simulated traffic's building blocks (a plan's state, ids, envelopes, calls, content) and
the legacy frontend's shapes: loose token_usage breakdowns, standalone messages and v0 bodies.
consumer/simulate/traffic.py plans threads with them."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

from consumer.simulate.config import (
    MODELS,
    PoisonSource,
    Record,
    TrafficConfig,
    parts,
)
from consumer.simulate.expectation import KEPT_UNKNOWN_FIELDS as KEPT_UNKNOWN_FIELDS
from consumer.simulate.expectation import SHAPES as SHAPES
from consumer.simulate.expectation import UNKNOWN_CALL_FIELDS as UNKNOWN_CALL_FIELDS
from consumer.simulate.expectation import UNKNOWN_ENVELOPE_FIELDS as UNKNOWN_ENVELOPE_FIELDS
from consumer.simulate.expectation import UNKNOWN_PART_FIELD as UNKNOWN_PART_FIELD
from consumer.simulate.expectation import Expectation as Expectation
from consumer.simulate.expectation import row_key
from producer import jsonvalues
from producer.client import thread_key
from producer.decoding import v0_event_id
from producer.events import (
    USAGE_MEASURES,
    AnyEvent,
    MessageAppended,
    UsageCall,
)


class PlannerBase:
    """A plan's state and its building blocks: ids, envelopes, calls, content."""

    def __init__(self, config: TrafficConfig, poison: PoisonSource | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # noqa: S311 - reproducible traffic, not secrets
        self.start = config.start if config.start is not None else datetime.now(UTC) - config.span()
        self.expect = Expectation()
        self.poison_counts: dict[int, int] = {}  # thread index -> its poison records (last)
        self.late: list[Record] = []  # published after everything else
        self.poison_source = poison
        # Of the thread being planned: records never to re-stamp (see `retried`), and the
        # wire documents of its turn-less v1 messages (what an event_id_conflict can reuse).
        self.pinned: set[bytes] = set()
        self.turnless: list[dict[str, Any]] = []

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def shape(self, name: str) -> None:
        self.expect.shapes[name] += 1

    def unknown(self) -> bool:
        return self.rng.random() < self.config.unknown_field_rate

    def encode(self, event: AnyEvent, **sent: Any) -> bytes:
        """The event's wire form (`sent` replaces fields with what a frontend sends as is);
        some envelopes carry fields this consumer does not know (ignored)."""
        document = {**event.model_dump(), **sent}
        if self.unknown():
            self.shape("unknown_envelope_fields")
            trace, producer = UNKNOWN_ENVELOPE_FIELDS
            document = {
                trace: f"{self.rng.getrandbits(128):032x}",
                **document,
                producer: {"name": "chat-api", "version": "2.7.0"},
            }
        return jsonvalues.dumps(document).encode()

    def calls(self) -> list[UsageCall]:
        calls = []
        for _ in range(self.rng.randint(1, 3)):
            model, kind, prompt_rate, completion_rate = self.rng.choice(MODELS)
            prompt = self.rng.randint(20, 4000)
            completion = 0 if kind == "embedding" else self.rng.randint(1, 1500)
            call: dict[str, Any] = {
                "model": model,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cost_micros": (prompt * prompt_rate + completion * completion_rate) // 1000,
                "call_kind": kind,
            }
            if self.rng.random() < 0.5:  # token kinds, as today's APIs report them
                call["cached_tokens"] = self.rng.randint(0, prompt)
                if completion:
                    call["reasoning_tokens"] = self.rng.randint(0, completion)
            if self.unknown():  # what newer producers add and this consumer does not know
                self.shape("unknown_call_fields")
                audio, latency = UNKNOWN_CALL_FIELDS
                call[audio] = self.rng.randint(0, prompt)
                call[latency] = self.rng.randint(1, 9000)
            calls.append(UsageCall.model_validate(call))
        return calls

    def content(self, text: str, *, tools: bool = True) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if tools and self.rng.random() < 0.4:
            parts.append(
                {
                    "type": "tool-call",
                    "toolCallId": f"call_{self.rng.getrandbits(32):08x}",
                    "toolName": "search",
                    "args": {"q": "Q3"},
                    "result": {"hits": self.rng.randint(0, 9)},
                }
            )
        for part in parts:
            if self.unknown():
                self.shape("unknown_part_fields")
                item = f"msg_{self.rng.getrandbits(64):016x}"
                part[UNKNOWN_PART_FIELD] = {"openai": {"itemId": item}}
        return parts


class LegacyShapes(PlannerBase):
    """The legacy frontend's appends, as it sends them (docs/contract.md#messageappended)."""

    def legacy_usage(self) -> tuple[dict[str, Any], dict[str, int], dict[str, dict[str, Any]]]:
        """A legacy `token_usage` as a frontend sends it, its totals and its breakdown as the
        ledger stores it: full, partial per model, `{}` or null (stored as `{}`)."""
        cfg, rng = self.config, self.rng
        full: dict[str, dict[str, Any]] = {}
        for model in rng.sample([m[0] for m in MODELS], rng.randint(1, 2)):
            prompt, completion = rng.randint(10, 900), rng.randint(1, 300)
            full[model] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cost_micros": rng.randint(1, 9000),
            }
        totals = {name: sum(entry[name] for entry in full.values()) for name in USAGE_MEASURES}
        draw = rng.random()
        breakdown: dict[str, dict[str, Any]] | None = full
        shape = "full"
        if draw < cfg.legacy_partial_rate:
            shape, breakdown = "partial", {m: self.partial(e) for m, e in full.items()}
        elif draw < cfg.legacy_partial_rate + cfg.legacy_empty_rate:
            shape, breakdown = "empty", {}
        elif draw < cfg.legacy_partial_rate + cfg.legacy_empty_rate + cfg.legacy_null_rate:
            shape, breakdown = "null", None
        self.shape(f"legacy_usage_{shape}")
        details = [{"model": model, **entry} for model, entry in full.items()]
        return {**totals, "usage": breakdown, "call_details": details}, totals, breakdown or {}

    def partial(self, entry: dict[str, int]) -> dict[str, int | None]:
        """Some of a model's measures (at least one left out; some of those sent as null)."""
        kept = self.rng.sample(USAGE_MEASURES, self.rng.randint(0, 3))
        return {
            name: entry[name] if name in kept else None
            for name in USAGE_MEASURES
            if name in kept or self.rng.random() < 0.3
        }

    def legacy(
        self, envelope: dict[str, Any], at: datetime, turn_id: str | None, *, wins: bool
    ) -> bytes:
        """A v1 legacy assistant append with token usage; `wins` when it is a message of its
        own (shadowing a server turn, it never wins)."""
        token_usage, totals, breakdown = self.legacy_usage()
        content = self.content(f"Answer 0: {self.rng.choice(self.config.queries)} …")
        message = MessageAppended(
            **envelope,
            type="message.appended",
            event_id=self.uuid(),
            occurred_at=at,
            turn_id=turn_id,
            role="assistant",
            content=parts(content),
        )
        value = self.encode(message, token_usage=token_usage)
        if wins:
            key = row_key(message.thread_id, None, "assistant", message.event_id)
            self.expect.set_content(key, content)
            self.expect.count_usage(key, "message.appended", totals, breakdown)
            self.expect.keep_parts(content)
            self.turnless.append(jsonvalues.loads(value))
        return value

    def standalone_legacy(self, envelope: dict[str, Any], at: datetime) -> bytes:
        """A legacy message without turn_id: a row of its own (keyed by its event_id)."""
        self.expect.messages += 1
        kind = self.rng.random()
        if kind < 0.7:
            self.shape("legacy_turnless_v1")
        if kind < 0.4:
            return self.legacy(envelope, at, None, wins=True)
        if kind < 0.7:
            content = self.content("typed in the old frontend", tools=False)
            self.expect.keep_parts(content)
            message = MessageAppended(
                **envelope,
                type="message.appended",
                event_id=self.uuid(),
                occurred_at=at,
                role="user",
                content=parts(content),
            )
            self.expect.set_content(
                row_key(message.thread_id, None, "user", message.event_id), content
            )
            value = self.encode(message)
            self.turnless.append(jsonvalues.loads(value))
            return value
        return self.v0_body(envelope)

    def v0_body(self, envelope: dict[str, Any]) -> bytes:
        """A v0 body: its event_id derives from the body (the text makes it unique), its
        occurred_at is the record timestamp; some are re-sent after everything else."""
        self.shape("v0_bodies")
        assistant = self.rng.random() < 0.5
        content = self.content(f"old bundle message {self.uuid()}", tools=assistant)
        body: dict[str, Any] = {
            "type": "message.appended",
            "schema_version": 0,
            "thread_id": envelope["thread_id"],
            "search_space_id": envelope["search_space_id"],
            "user_id": str(envelope["user_id"]),
            "turn_id": None,
            "role": "assistant" if assistant else "user",
            "content": content,
        }
        if assistant:
            body["token_usage"], totals, breakdown = self.legacy_usage()
        key = row_key(body["thread_id"], None, body["role"], v0_event_id(body))
        self.expect.set_content(key, content)
        if assistant:
            self.expect.count_usage(key, "message.appended", totals, breakdown)
        self.expect.keep_parts(content)
        value = json.dumps(body).encode()
        self.pinned.add(value)  # no occurred_at to re-stamp: its re-sends are the v0 retries
        if self.rng.random() < self.config.v0_resend_rate:
            self.late.append((thread_key(envelope["thread_id"]), value))
            self.shape("v0_resent_later")
            self.expect.duplicates += 1
        return value
