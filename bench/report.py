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
Key = tuple[str, str, str]  # (tree, scenario, measure)


@dataclass
class Results:
    samples: dict[Key, list[float]] = field(default_factory=lambda: defaultdict(list))
    records: int = 0
    ledger: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, scenario: str, measure: str, value: float, tree: str = SHARED) -> None:
        self.samples[(tree, scenario, measure)].append(value)

    def drain(self, tree: str, scenario: str, drain: Drain, records: int) -> None:
        self.add(scenario, "events/s", records / drain.seconds, tree)
        self.add(scenario, "consumer CPU µs/event", drain.cpu_seconds / records * 1e6, tree)
        self.add(scenario, "PostgreSQL µs/event", drain.pg_cpu_seconds / records * 1e6, tree)
        self.add(scenario, "peak RSS MiB", drain.peak_rss_kib / 1024, tree)

    def latency(self, tree: str, latency: Latency) -> None:
        self.add("produce→commit at 1,000 ev/s", "p50 ms", latency.p50_ms, tree)
        self.add("produce→commit at 1,000 ev/s", "p99 ms", latency.p99_ms, tree)

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
    value: Callable[[Results, str], float | None]
    met: Callable[[float], bool]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


TARGETS = (
    Target(
        "first drain events/s",
        "≥ 20,000",
        lambda r, c: r.median(c, "first drain", "events/s"),
        lambda v: v >= 20_000,
    ),
    Target(
        "re-drain / first drain",
        "≥ 1.5x",
        lambda r, c: _ratio(
            r.median(c, "re-drain", "events/s"), r.median(c, "first drain", "events/s")
        ),
        lambda v: v >= 1.5,
    ),
    Target(
        "consumer CPU µs/event (first drain)",
        "≤ 35",
        lambda r, c: r.median(c, "first drain", "consumer CPU µs/event"),
        lambda v: v <= 35,
    ),
    Target(
        "PostgreSQL µs/event (first drain)",
        "≤ 20",
        lambda r, c: r.median(c, "first drain", "PostgreSQL µs/event"),
        lambda v: v <= 20,
    ),
    Target(
        "first drain / naive",
        "≥ 25x",
        lambda r, c: _ratio(
            r.median(c, "first drain", "events/s"),
            r.median(SHARED, "naive: a transaction per event", "events/s"),
        ),
        lambda v: v >= 25,
    ),
    Target(
        "p99 produce→commit ms",
        "≤ 250",
        lambda r, c: r.median(c, "produce→commit at 1,000 ev/s", "p99 ms"),
        lambda v: v <= 250,
    ),
    Target(
        "peak RSS MiB over 1,000,000 records",
        "≤ 256",
        lambda r, c: r.median(c, "1,000,000 records", "peak RSS MiB"),
        lambda v: v <= 256,
    ),
    Target(
        "verify's peak RSS MiB over 1,000,000 records",
        "≤ 256",
        lambda r, c: r.median(c, "verify 1,000,000 records", "peak RSS MiB"),
        lambda v: v <= 256,
    ),
)


def table(results: Results, baseline: str, candidate: str) -> str:
    lines = [
        f"{results.records:,} simulated records, 6 partitions; median (min-max) of each figure",
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
    lines += ["", "| target | goal | candidate | baseline | met |", "|---|---|---|---|---|"]
    for target in TARGETS:
        value = target.value(results, candidate)
        before = target.value(results, baseline)
        shown = f"{value:,.1f}" if value is not None else "not measured"
        was = f"{before:,.1f}" if before is not None else ""
        met = "" if value is None else ("yes" if target.met(value) else "**no**")
        lines.append(f"| {target.what} | {target.goal} | {shown} | {was} | {met} |")
    return "\n".join(lines)
