"""The budget rules, pure (docs/contract.md#budgets-and-spend-alerts).

A budget's period is a UTC calendar day or month, or all time (`total`); a usage row belongs to
the period of its winning event's occurred_at (`source_at`). A (budget, period, measure,
threshold) is crossed when the period's spend is at least threshold % of the limit. Each change
of that state is one alert, numbered: sequence 1 is the first crossing, 2 its withdrawal, 3 the
next crossing (odd: crossed).

migrations/versions/0012_budget_periods.py executes these rules inside the batch transaction
(`budget_judge`); `verify` and the tests judge with this module, and a property test holds
the two equal on generated traffic.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

from producer.events import MAX_INT64

PERIODS = ("day", "month", "total")
MEASURES = ("cost_micros", "total_tokens")
DEFAULT_THRESHOLDS = (50, 80, 100)
MAX_THRESHOLD = 1000  # percent: an alert at ten times the limit is the most anyone asks for
MAX_THRESHOLDS = 20
# Where the `total` period starts: the earliest instant an event may carry.
TOTAL_START = datetime(1, 1, 1, tzinfo=UTC)

Period = Literal["day", "month", "total"]
Kind = Literal["crossed", "withdrawn"]
StateKey = tuple[str, int]  # (measure, threshold)
Key = TypeVar("Key", bound=Hashable)  # a state's key: (measure, threshold), or with its period


@dataclass(frozen=True)
class Budget:
    id: int
    search_space_id: int
    user_id: uuid.UUID | None
    period: str
    cost_micros_limit: int | None
    total_tokens_limit: int | None
    thresholds: tuple[int, ...]

    def limits(self) -> dict[StateKey, int]:
        """Every (measure, threshold) the budget judges, with the measure's limit."""
        by_measure = {
            "cost_micros": self.cost_micros_limit,
            "total_tokens": self.total_tokens_limit,
        }
        return {
            (measure, threshold): limit
            for measure, limit in by_measure.items()
            if limit is not None
            for threshold in self.thresholds
        }

    def covers(self, search_space_id: int, user_id: uuid.UUID | None) -> bool:
        """Whether usage of this space and user counts against the budget."""
        return search_space_id == self.search_space_id and (
            self.user_id is None or self.user_id == user_id
        )


def period_start(period: str, at: datetime) -> datetime:
    """The start of the UTC period holding `at`."""
    at = at.astimezone(UTC)
    if period == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return TOTAL_START


def crossed(spend: int, limit: int | None, threshold: int) -> bool:
    """Spend at or above threshold % of the limit (exact integers: no rounding)."""
    return limit is not None and spend * 100 >= limit * threshold


def judge(spends: Mapping[str, int], limits: Mapping[StateKey, int | None]) -> dict[StateKey, bool]:
    """The state of every (measure, threshold) of one period from its spend per measure."""
    return {
        (measure, threshold): crossed(spends.get(measure, 0), limit, threshold)
        for (measure, threshold), limit in limits.items()
    }


def transition(was: bool, now: bool) -> Kind | None:
    """The alert a change of state emits, if any."""
    if was == now:
        return None
    return "crossed" if now else "withdrawn"


def alerts(before: Mapping[Key, bool], after: Mapping[Key, bool]) -> dict[Key, Kind]:
    """The alerts of a change of states: a key absent from either side is not crossed there."""
    emitted = {}
    for key in {*before, *after}:
        if (kind := transition(before.get(key, False), after.get(key, False))) is not None:
            emitted[key] = kind
    return emitted


def alert_id(budget_id: int, start: datetime, measure: str, threshold: int, sequence: int) -> str:
    """The CloudEvent id: "{budget id}:{period start}:{measure}:{threshold}:{sequence}", the
    period start as its UTC date (a period starts at midnight)."""
    return (
        f"{budget_id}:{start.astimezone(UTC).date().isoformat()}:{measure}:{threshold}:{sequence}"
    )


def parse_thresholds(text: str) -> tuple[int, ...]:
    """`50,80,100` as sorted distinct percents; ValueError saying what is wrong."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--thresholds {text!r}: expected integers like 50,80,100") from None
    if not values:
        raise ValueError("--thresholds: give at least one percent, like 50,80,100")
    if len(values) > MAX_THRESHOLDS:
        raise ValueError(f"--thresholds: at most {MAX_THRESHOLDS} thresholds")
    for value in values:
        if not 1 <= value <= MAX_THRESHOLD:
            raise ValueError(f"--thresholds: {value} % is not within 1 .. {MAX_THRESHOLD} %")
    return tuple(values)


def check_limits(cost_micros: int | None, tokens: int | None) -> None:
    """ValueError unless at least one limit is given and every given one is positive."""
    if cost_micros is None and tokens is None:
        raise ValueError("give a limit: --cost-micros N and/or --tokens N")
    for option, value in (("--cost-micros", cost_micros), ("--tokens", tokens)):
        if value is not None and not 0 < value <= MAX_INT64:
            raise ValueError(
                f"{option} {value}: a limit is a positive integer of at most {MAX_INT64}"
            )


def spends_by_period(
    budget: Budget, usage: Iterable[tuple[int, uuid.UUID | None, datetime, int, int]]
) -> dict[datetime, dict[str, int]]:
    """A budget's spend per period from usage rows (space, user, source_at, cost_micros,
    total_tokens): what the ledger's rows sum to, summed here independently of the SQL."""
    spends: dict[datetime, dict[str, int]] = {}
    for space, user, at, cost, tokens in usage:
        if budget.covers(space, user):
            sums = spends.setdefault(period_start(budget.period, at), dict.fromkeys(MEASURES, 0))
            sums["cost_micros"] += cost
            sums["total_tokens"] += tokens
    return spends
