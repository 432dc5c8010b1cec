"""The benchmark's figures: samples per (code tree, scenario, measure), summarised as median
with min and max, one Markdown table with the candidate/baseline ratio, and the issue's
targets checked against the candidate's medians."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.consumers import Drain
from bench.latency import Latency

SHARED = ""  # bounds measured once for both trees (raw read, COPY, naive)
LATENCY_RATE = 5_000  # events/s, steady
LATENCY = f"produce→commit at {LATENCY_RATE:,} ev/s"
POISON = "first drain, 30 % poison"
MILLION = "1,000,000 records"
API = "usage API: a space's month by day by model"
API_LOAD = "usage API: loading its ledger"
INDEX = "ix_token_usage_search_space_id_source_at"
REPLACED = "ix_token_usage_search_space_id_created_at"  # dropped by migration 0009 for INDEX
INDEXED = f"first drain, with {INDEX}"
UNINDEXED = f"first drain, with {REPLACED} instead"
INDEX_COST = f"cost of {INDEX} over {REPLACED}, run by run"
LOST = "first drain's rate lost, %"
BUDGETED = "first drain, with 10,000 budgets"
UNBUDGETED = "first drain, without budgets"
BUDGETS_COST = "cost of 10,000 budgets, run by run"
Key = tuple[str, str, str]  # (tree, scenario, measure)


@dataclass
class Results:
    samples: dict[Key, list[float]] = field(default_factory=lambda: defaultdict(list))
    records: int = 0
    ledger: dict[str, int] = field(default_factory=dict)
    api: str = ""  # what the usage API was measured on, when it was
    seconds: float = 0.0

    def add(self, scenario: str, measure: str, value: float, tree: str = SHARED) -> None:
        self.samples[(tree, scenario, measure)].append(value)

    def drain(self, tree: str, scenario: str, drain: Drain, records: int) -> None:
        self.add(scenario, "events/s", records / drain.seconds, tree)
        self.add(scenario, "consumer CPU µs/event", drain.cpu_seconds / records * 1e6, tree)
        self.add(scenario, "PostgreSQL µs/event", drain.pg_cpu_seconds / records * 1e6, tree)
        self.add(scenario, "peak RSS MiB", drain.peak_rss_kib / 1024, tree)
        if drain.idle_seconds is not None:  # where the wall time went, in % of it
            busy = drain.cpu_seconds / drain.seconds * 100
            self.add(scenario, "consumer busy %", busy, tree)
            for what, seconds in sorted(drain.idle_seconds.items()):
                self.add(scenario, f"waiting on {what} %", seconds / drain.seconds * 100, tree)

    def latency(self, tree: str, latency: Latency) -> None:
        self.add(LATENCY, "p50 ms", latency.p50_ms, tree)
        self.add(LATENCY, "p99 ms", latency.p99_ms, tree)
        self.add(LATENCY, "sent late p99 ms", latency.late_p99_ms, tree)

    def median(self, tree: str, scenario: str, measure: str) -> float | None:
        values = self.samples.get((tree, scenario, measure))
        return statistics.median(values) if values else None


def summary(results: Results) -> dict[str, dict[str, float]]:
    return {
        " | ".join(part for part in key if part): {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
            "runs": len(values),
        }
        for key, values in results.samples.items()
    }


def _cell(values: list[float] | None) -> str:
    if not values:
        return ""
    median = statistics.median(values)
    digits = 0 if median >= 100 else 1
    if len(values) == 1:
        return f"{median:,.{digits}f}"
    return f"{median:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


@dataclass(frozen=True)
class Target:
    what: str
    goal: str
    value: Callable[[Results, str, str], float | None]  # (results, candidate, baseline)
    met: Callable[[float], bool]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _speedup(scenario: str) -> Callable[[Results, str, str], float | None]:
    return lambda r, c, b: _ratio(
        r.median(c, scenario, "events/s"), r.median(b, scenario, "events/s")
    )


def _figure(scenario: str, measure: str) -> Callable[[Results, str, str], float | None]:
    return lambda r, c, b: r.median(c, scenario, measure)


# The targets of the per-event-cost issue and of the usage API's (docs/development.md#benchmarks).
TARGETS = (
    Target("first drain vs baseline", "≥ 2.5x", _speedup("first drain"), lambda v: v >= 2.5),
    Target("re-drain vs baseline", "≥ 4x", _speedup("re-drain"), lambda v: v >= 4),
    Target(
        "consumer CPU µs/event, first drain",
        "≤ 50",
        _figure("first drain", "consumer CPU µs/event"),
        lambda v: v <= 50,
    ),
    Target(
        "consumer CPU µs/event, re-drain",
        "≤ 20",
        _figure("re-drain", "consumer CPU µs/event"),
        lambda v: v <= 20,
    ),
    Target(
        "PostgreSQL µs/event, first drain",
        "≤ 55",
        _figure("first drain", "PostgreSQL µs/event"),
        lambda v: v <= 55,
    ),
    Target("30 % poison vs baseline", "≥ 3x", _speedup(POISON), lambda v: v >= 3),
    Target(
        "peak RSS MiB, consume of 1,000,000 records",
        "≤ 256",
        _figure(MILLION, "peak RSS MiB"),
        lambda v: v <= 256,
    ),
    Target(
        "peak RSS MiB, verify of 1,000,000 records",
        "≤ 256",
        _figure("verify 1,000,000 records", "peak RSS MiB"),
        lambda v: v <= 256,
    ),
    Target(
        "drain rate at 1,000,000 records / first drain",
        "≥ 0.95x",
        lambda r, c, b: _ratio(
            r.median(c, MILLION, "events/s"), r.median(c, "first drain", "events/s")
        ),
        lambda v: v >= 0.95,
    ),
    Target(
        f"p99 produce→commit ms at {LATENCY_RATE:,} ev/s",
        "≤ 250",
        _figure(LATENCY, "p99 ms"),
        lambda v: v <= 250,
    ),
    Target(
        "usage API p99 ms, a space's month by day by model",
        "≤ 100",
        _figure(API, "p99 ms"),
        lambda v: v <= 100,
    ),
    Target(
        f"first drain's rate lost to {INDEX} over {REPLACED}, %",
        "< 5",
        _figure(INDEX_COST, LOST),
        lambda v: v < 5,
    ),
    Target(
        "first drain's rate lost to 10,000 budgets, %",
        "≤ 10",
        _figure(BUDGETS_COST, LOST),
        lambda v: v <= 10,
    ),
)


def rate_lost(with_index: float, without: float) -> float:
    """What an index costs a drain, in % of the rate without it (negative: it went faster)."""
    return (1 - with_index / without) * 100


def table(results: Results, baseline: str, candidate: str) -> str:
    lines = [
        f"{results.records:,} simulated records, 6 partitions; median (min-max) of each figure",
        *([f"usage API: {results.api}"] if results.api else []),
        "",
        f"| scenario | measure | {baseline} | {candidate} | candidate / baseline |",
        "|---|---|---|---|---|",
    ]
    rows = list(dict.fromkeys((scenario, measure) for _, scenario, measure in results.samples))
    for scenario, measure in rows:
        shared = results.samples.get((SHARED, scenario, measure))
        if shared:
            lines.append(f"| {scenario} | {measure} | {_cell(shared)} (both) | | |")
            continue
        base = results.samples.get((baseline, scenario, measure))
        cand = results.samples.get((candidate, scenario, measure))
        ratio = _ratio(
            statistics.median(cand) if cand else None, statistics.median(base) if base else None
        )
        lines.append(
            f"| {scenario} | {measure} | {_cell(base)} | {_cell(cand)} | "
            + (f"{ratio:.2f}x" if ratio is not None else "")
            + " |"
        )
    lines += ["", "| target | goal | candidate | met |", "|---|---|---|---|"]
    for target in TARGETS:
        value = target.value(results, candidate, baseline)
        shown = f"{value:,.2f}" if value is not None else "not measured"
        met = "" if value is None else ("yes" if target.met(value) else "**no**")
        lines.append(f"| {target.what} | {target.goal} | {shown} | {met} |")
    return "\n".join(lines)
