"""What a traffic plan must produce: the ledger summary, row by row and in total.

Kept by construction (what each scenario of `consumer.simulate.traffic` creates), never by running
the merge rules, so it is an independent check of the consumer. `Expectation.rows` names every
message the ledger must hold with its content and its authoritative usage; the summary fields
count them, per model split by `producer.events.attribution` (docs/contract.md#per-model-attribution).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.events import USAGE_MEASURES, UsageCall, attribution

# Fields of newer producers that this consumer does not know: kept where they are (calls,
# parts), ignored in the envelope.
UNKNOWN_CALL_FIELDS = ("audio_tokens", "provider_latency_ms")
UNKNOWN_PART_FIELD = "providerMetadata"
UNKNOWN_ENVELOPE_FIELDS = ("trace_id", "producer")
# What the ledger must keep of them: sums over the stored call_details, parts in stored content.
KEPT_UNKNOWN_FIELDS = (
    *(f"call_details.{name}" for name in UNKNOWN_CALL_FIELDS),
    f"content.{UNKNOWN_PART_FIELD}",
)
SHAPES = (
    "finalized_twice",
    "shuffled_threads",
    "legacy_shadowing_a_turn",
    "legacy_turnless_v1",
    "v0_bodies",
    "legacy_usage_full",
    "legacy_usage_partial",
    "legacy_usage_empty",
    "legacy_usage_null",
    "duplicates_right_after",
    "retries_later",
    "v0_resent_later",
    "unknown_call_fields",
    "unknown_part_fields",
    "unknown_envelope_fields",
    "poison",
)


# A message's identity in the ledger: (thread_id, turn_id, role) for a turn's messages, and
# (thread_id, "event:{event_id}", role) for a turn-less one, which is keyed by its event.
RowKey = tuple[int, str, str]


@dataclass
class ExpectedRow:
    """One message: its content as stored, and its usage as (source event type, the four
    measures in USAGE_MEASURES order), or None when it has none."""

    content: list[dict[str, Any]]
    usage: tuple[str, int, int, int, int] | None = None


def row_key(thread_id: int, turn_id: str | None, role: str, event_id: object) -> RowKey:
    return (thread_id, turn_id if turn_id is not None else f"event:{event_id}", role)


@dataclass
class Expectation:
    threads: int = 0
    messages: int = 0
    usage_rows: int = 0
    dead_letters: int = 0
    records: int = 0
    duplicates: int = 0  # exact copies published: right after, retried later, v0 re-sent
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    kept_unknown_fields: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(KEPT_UNKNOWN_FIELDS, 0)
    )
    shapes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHAPES, 0))
    restamped: int = 0  # retries that re-stamped occurred_at: differing copies, no duplicates
    rows: dict[RowKey, ExpectedRow] = field(default_factory=dict)  # not in to_json: large

    @property
    def total_cost_micros(self) -> int:
        return sum(m["cost_micros"] for m in self.per_model.values())

    @property
    def total_tokens(self) -> int:
        return sum(m["total_tokens"] for m in self.per_model.values())

    def count_usage(
        self,
        key: RowKey,
        source: str,
        totals: Mapping[str, int],
        breakdown: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """One authoritative usage row: its totals, split per model by the attribution rule."""
        self.usage_rows += 1
        prompt, completion, total, cost = (totals[name] for name in USAGE_MEASURES)
        self.rows[key].usage = (source, prompt, completion, total, cost)
        for model, share in attribution(totals, breakdown).items():
            sums = self.per_model.setdefault(model, dict.fromkeys(USAGE_MEASURES, 0))
            for name in USAGE_MEASURES:
                sums[name] += share[name]

    def set_content(self, key: RowKey, content: list[dict[str, Any]]) -> None:
        """The content a message must end with (the winner of its content register)."""
        self.rows.setdefault(key, ExpectedRow([])).content = content

    def keep_calls(self, calls: list[UsageCall]) -> None:
        for call in calls:
            for name, value in (call.model_extra or {}).items():
                self.kept_unknown_fields[f"call_details.{name}"] += value

    def keep_parts(self, parts: list[dict[str, Any]]) -> None:
        self.kept_unknown_fields[f"content.{UNKNOWN_PART_FIELD}"] += sum(
            UNKNOWN_PART_FIELD in part for part in parts
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "messages": self.messages,
            "usage_rows": self.usage_rows,
            "dead_letters": self.dead_letters,
            "records": self.records,
            "duplicates": self.duplicates,
            "restamped": self.restamped,
            "total_tokens": self.total_tokens,
            "total_cost_micros": self.total_cost_micros,
            "per_model": {model: self.per_model[model] for model in sorted(self.per_model)},
            "kept_unknown_fields": dict(self.kept_unknown_fields),
            "shapes": dict(self.shapes),
        }
