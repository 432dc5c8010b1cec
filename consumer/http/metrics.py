"""Every Prometheus object of the consumer, named `token_ledger_<what>_<unit>[_total]`.

Labels never carry user, thread, message, tenant or budget ids: only event type, outcome, reason,
model, token kind, partition, SQLSTATE, HTTP rejection reason, and a budget alert's kind, measure
and threshold, all of bounded cardinality.

Token and cost counters move once per usage that became authoritative: by the new row's sums,
or, when it supersedes a stored one, by the difference, per model as `merge.attribution`
splits a row (the part its breakdown does not cover is `model="(unattributed)"`). Counters
cannot go down, so a difference below zero is counted in `token_ledger_*_reversed_total` with
the same labels: `sum(cost_micros_total) - sum(cost_micros_reversed_total)` equals
`SUM(cost_micros)` of the ledger that this process wrote, per model and in total.
"""

from __future__ import annotations

import collections
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from consumer.errors import DeadLetterUnavailableError, TransientError, UnexpectedError
from consumer.http.server import REJECTIONS
from consumer.ledger.applied import event_type as applied_type
from consumer.ledger.batch import Applied, Decoded
from consumer.ledger.claims import Outcome, UsageChange

# *_created series only double the exposition; rate() and increase() need none.
disable_created_metrics()  # type: ignore[no-untyped-call]


MAX_MODEL_LABELS = 500
MAX_LABEL_CHARS = 200
OTHER_MODELS = "(other)"


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._models: set[str] = set()
        r = self.registry
        self.idle_seconds = Counter(
            "token_ledger_idle_seconds",
            "Time the consumer sat idle waiting on postgres (the batch in flight) or kafka (a"
            " fetch with nothing buffered).",
            ["waiting_on"],
            registry=r,
        )
        self.events = Counter(
            "token_ledger_events",
            "Events by type and outcome (applied, duplicate, superseded, dead_lettered).",
            ["type", "outcome"],
            registry=r,
        )
        self.redelivered = Counter(
            "token_ledger_redelivered_records",
            "Records this group had applied before, recognised by their fingerprint and not"
            " decoded again (also counted as duplicate events).",
            registry=r,
        )
        self.dead_letters = Counter(
            "token_ledger_dead_letters",
            "Records written to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "token_ledger_batch_size",
            "Records per batch.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "token_ledger_batch_seconds",
            "Time from receiving a batch to its database commit.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.event_lag = Histogram(
            "token_ledger_event_lag_seconds",
            "Commit time minus the event's occurred_at.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.consumer_lag = Gauge(
            "token_ledger_consumer_lag_records",
            "Last stable offset minus the consumer's position, per assigned partition:"
            " committed records readable now and not yet applied.",
            ["partition"],
            registry=r,
        )
        self.uncommitted = Gauge(
            "token_ledger_uncommitted_records",
            "High watermark minus last stable offset, per assigned partition: records that"
            " cannot be read until an open transaction ends.",
            ["partition"],
            registry=r,
        )
        self._uncommitted_partitions: set[int] = set()
        self.outbox_pending = Gauge(
            "token_ledger_outbox_pending",
            "Usage revisions in billing_outbox not yet published to the billing topic.",
            registry=r,
        )
        self.billing_refused = Gauge(
            "token_ledger_billing_refused",
            "Usage revisions the billing topic refused for good (too large, not authorised);"
            " each holds its message's later revisions until the relay restarts.",
            registry=r,
        )
        self.budget_alerts_pending = Gauge(
            "token_ledger_budget_alerts_pending",
            "Budget alerts in budget_alert_outbox not yet published to the budget topic.",
            registry=r,
        )
        # By threshold, never by tenant: thresholds are a handful of percents per deployment.
        self.budget_alerts = Counter(
            "token_ledger_budget_alerts",
            "Budget alerts published: threshold crossings and withdrawals, by measure and"
            " threshold (percent).",
            ["kind", "measure", "threshold"],
            registry=r,
        )
        self.tokens = Counter(
            "token_ledger_tokens",
            "Tokens of authoritative usage, by model and kind (prompt, completion, total).",
            ["model", "kind"],
            registry=r,
        )
        self.tokens_reversed = Counter(
            "token_ledger_tokens_reversed",
            "Tokens taken back when a usage row was superseded by a smaller one.",
            ["model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "token_ledger_cost_micros",
            "Cost (micro-units) of authoritative usage, by model.",
            ["model"],
            registry=r,
        )
        self.cost_reversed = Counter(
            "token_ledger_cost_micros_reversed",
            "Cost taken back when a usage row was superseded by a cheaper one.",
            ["model"],
            registry=r,
        )
        self.db_retries = Counter(
            "token_ledger_db_retries",
            "Batch transactions retried after a transient database failure, by SQLSTATE.",
            ["sqlstate"],
            registry=r,
        )
        self.rebalances = Counter(
            "token_ledger_rebalances", "Partition assignments received.", registry=r
        )
        self.fenced_batches = Counter(
            "token_ledger_fenced_batches",
            "Batches rolled back because another owner had moved the stored offsets.",
            registry=r,
        )
        self.last_commit = Gauge(
            "token_ledger_last_commit_timestamp_seconds",
            "Unix time of the last committed batch.",
            registry=r,
        )
        self.offset_resets = Counter(
            "token_ledger_offset_resets",
            "Stored offsets found outside their partition's log (topic recreated, retention "
            "passed, unclean election), by partition.",
            ["partition"],
            registry=r,
        )
        self.halted_partitions = Gauge(
            "token_ledger_partition_halted",
            "1 while a partition is stopped (a dead letter refused, an offset out of range with "
            "LEDGER_OFFSET_RESET=fail); /readyz says why.",
            ["partition"],
            registry=r,
        )
        self.unknown_fields = Counter(
            "token_ledger_unknown_fields",
            "Fields this consumer does not know yet, accepted (kept in content parts, usage "
            "calls and legacy breakdowns; ignored elsewhere), by event type.",
            ["type"],
            registry=r,
        )
        self.ready = Gauge(
            "token_ledger_ready",
            "1 when ready (judged every second by the consumer itself; /readyz answers the same).",
            registry=r,
        )
        self.http_rejected = Counter(
            "token_ledger_http_connections_rejected",
            "HTTP connections closed without being served, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REJECTIONS:  # every series exists from the start, so rate() sees the first
            self.http_rejected.labels(reason)

    def observe_committed(
        self, applied: Applied, decoded: Decoded, *, records: int, seconds: float
    ) -> None:
        """What a committed batch did (its decoding, and its transaction)."""
        decode_letters = decoded.letters
        self.observe_batch(
            records=records,
            seconds=seconds,
            outcomes=[
                (event.type, event.occurred_at, outcome) for event, outcome in applied.events
            ],
            redelivered=[applied_type(stored) for _, stored in decoded.redelivered],
            unknown_fields=list(decoded.unknown_fields.items()),
            undecodable=[letter.event_type for letter in decode_letters],
            # Only those sent: a position this group dead-lettered before (an offset replay)
            # is not sent, nor counted, again.
            dead_letter_reasons=[letter.reason.value for letter in applied.sent],
            usage_changes=[change for plan in applied.plans for change in plan.usage_changes],
        )

    def observe_batch(
        self,
        *,
        records: int,
        seconds: float,
        outcomes: list[tuple[str, datetime, Outcome]],
        redelivered: list[str],
        unknown_fields: list[tuple[str, int]],
        undecodable: list[str | None],
        dead_letter_reasons: list[str],
        usage_changes: list[UsageChange],
    ) -> None:
        """Everything one committed batch did: counted per label set first, so a batch costs
        one `labels()` lookup per distinct label set, not one per event."""
        now = datetime.now(UTC)
        self.batch_size.observe(records)
        self.batch_seconds.observe(seconds)
        self.last_commit.set(now.timestamp())
        events: collections.Counter[tuple[str, str]] = collections.Counter()
        lags = []
        for event_type, occurred_at, outcome in outcomes:
            events[event_type, outcome.value] += 1
            if outcome is not Outcome.REJECTED:
                lags.append(max(0.0, (now - occurred_at).total_seconds()))
        observe_many(self.event_lag, lags)
        for event_type in redelivered:  # applied before, not decoded again: no lag to observe
            events[event_type, Outcome.DUPLICATE.value] += 1
        self.redelivered.inc(len(redelivered))
        for named in undecodable:  # the type the record names if it is one of ours
            events[named or "unknown", Outcome.REJECTED.value] += 1
        for (event_type, outcome_name), count in events.items():
            self.events.labels(event_type, outcome_name).inc(count)
        unknown: collections.Counter[str] = collections.Counter()
        for event_type, count in unknown_fields:
            unknown[event_type] += count
        for event_type, count in unknown.items():
            self.unknown_fields.labels(event_type).inc(count)
        for reason, count in collections.Counter(dead_letter_reasons).items():
            self.dead_letters.labels(reason).inc(count)
        self.count_usage(usage_changes)

    def set_uncommitted(self, records: Mapping[int, int]) -> None:
        """Records held by open transactions, for every partition given; a partition no longer
        given (revoked) loses its series."""
        for partition in self._uncommitted_partitions - records.keys():
            self.uncommitted.remove(str(partition))
        for partition, count in records.items():
            self.uncommitted.labels(str(partition)).set(count)
        self._uncommitted_partitions = set(records)

    def _model_label(self, model: str) -> str:
        # Legacy breakdowns name models freely: bound the label's cardinality (the ledger and
        # `usage --by model` keep every name; the sums here stay whole under "(other)").
        if model in self._models or len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model[:MAX_LABEL_CHARS]
        return OTHER_MODELS

    def count_usage(self, changes: list[UsageChange]) -> None:
        # Summed per model first: the counters move once per label set and sign, as they
        # would for each change one by one.
        up: collections.Counter[tuple[Counter, str, str]] = collections.Counter()
        down: collections.Counter[tuple[Counter, str, str]] = collections.Counter()
        for change in changes:
            model = self._model_label(change.model)
            deltas = (
                (self.tokens, self.tokens_reversed, "prompt", change.prompt_tokens),
                (self.tokens, self.tokens_reversed, "completion", change.completion_tokens),
                (self.tokens, self.tokens_reversed, "total", change.total_tokens),
                (self.cost, self.cost_reversed, "", change.cost_micros),
            )
            for forward, reversed_, kind, delta in deltas:
                if delta > 0:
                    up[forward, model, kind] += delta
                elif delta < 0:
                    down[reversed_, model, kind] += -delta
        for totals in (up, down):
            for (counter, model, kind), amount in totals.items():
                (counter.labels(model, kind) if kind else counter.labels(model)).inc(amount)


class CountRetries:
    """token_ledger_db_retries_total for the pipeline's retries (a consumer/retry.py
    RetryObserver), by SQLSTATE: `unavailable` with none, `unexpected` for an unclassified
    error; a dead-letter topic that did not acknowledge is no database retry."""

    def __init__(self, metrics: LedgerMetrics) -> None:
        self.metrics = metrics

    def retrying(self, error: TransientError) -> None:
        if isinstance(error, UnexpectedError):
            self.metrics.db_retries.labels("unexpected").inc()
        elif not isinstance(error, DeadLetterUnavailableError):
            self.metrics.db_retries.labels(error.sqlstate or "unavailable").inc()

    def succeeded(self) -> None:
        pass

    def finished(self) -> None:
        pass


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every value, with each bucket and the sum moved once (one
    lock each) instead of once per value. It reads prometheus_client's own attributes:
    tests/unit/consumer/http/test_metrics.py holds it equal to observing one by one."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)
