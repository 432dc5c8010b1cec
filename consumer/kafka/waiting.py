"""Where the consumer's wall time goes: the time it sat idle while waiting on PostgreSQL (the
batch in flight, with the next one already decoded) or on Kafka (a fetch with nothing
buffered). Over one wait, idle is the wall time minus the CPU this thread spent meanwhile on
other tasks (the relay, the next batch, the HTTP server), so the figures never count work as
waiting. `make bench` reads them from the `caught up` line of `consume --until-idle`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter

WAITS = ("postgres", "kafka")


class IdleClock:
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.seconds = dict.fromkeys(WAITS, 0.0)

    @contextmanager
    def waiting_on(self, what: str) -> Iterator[None]:
        wall, cpu = time.monotonic(), time.thread_time()
        try:
            yield
        finally:
            idle = max(0.0, (time.monotonic() - wall) - (time.thread_time() - cpu))
            self.seconds[what] += idle
            self.counter.labels(what).inc(idle)

    def summary(self) -> dict[str, float]:
        """This process's CPU so far and its idle time by what it waited on (log fields)."""
        return {
            "cpu_seconds": round(time.process_time(), 3),
            **{f"idle_on_{what}_seconds": round(s, 3) for what, s in self.seconds.items()},
        }
