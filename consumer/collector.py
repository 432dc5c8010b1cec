"""The garbage collector as a long-running consumer wants it (docs/design.md#choices-worth-knowing).

A batch allocates hundreds of thousands of short-lived objects, and reference counting frees
them when it commits: what the cyclic collector finds there is next to nothing, and walking
them costs CPU and pauses. So `consume` starts a collection by the count only once
YOUNG_THRESHOLD more objects than at the last collection are counted alive (allocations less
frees), which a drain at the default batch size does not reach. Cycles do arise elsewhere,
slowly: each failed connection attempt during a database outage leaves ~100 cyclic objects
(with `sslmode=verify-full`, an SSL context holding the loaded CA bundle, ~0.8 MiB), each HTTP
request a few, a retried batch its tracebacks. Left to the count they would stay for an hour
of outage, so `sweep` collects on a clock as well.
"""

from __future__ import annotations

import asyncio
import gc

# A batch of 2,000 events (the default LEDGER_MAX_BATCH), decoded and folded, counts ~35,000
# objects (tests/unit/consumer/test_collector.py): the batch in flight and the next stay far
# below this. Past ~6,000 events a batch, the count starts a collection about once a batch.
YOUNG_THRESHOLD = 200_000
SWEEP_SECONDS = 10.0
FULL_SWEEP_EVERY = 6  # sweeps: every generation once a minute


def tune() -> None:
    """What start-up loaded (modules, validators, settings) is never garbage: its cycles are
    collected once, then the rest is frozen out of the collector's sight. Measured on
    100,000-record first drains: the threshold at 20,000 (from 700) took ~10 % off the
    consumer's CPU; at 200,000, ~47 collections about once a batch (~0.8 s, pauses up to
    ~35 ms) gave way to the sweep's one or two, and 3-4 % of the CPU went with them."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


async def sweep(every: float = SWEEP_SECONDS, full_every: int = FULL_SWEEP_EVERY) -> None:
    """Until cancelled, collect the young generation every `every` seconds and every
    generation every `full_every` sweeps: a cycle is freed within seconds of becoming garbage,
    or, if it was alive at a sweep (a batch being retried, a connection attempt under way),
    within a minute. An explicit collection of the young generation never starts an older
    one's, whatever their counts, hence the full ones. A sweep's pause is a walk over what was
    allocated since the previous one and is still alive: ~40 ms during a drain, with a batch in
    flight and the next alive; a full one adds what start-up left unfrozen."""
    sweeps = 0
    while True:
        await asyncio.sleep(every)
        sweeps += 1
        gc.collect(2 if sweeps % full_every == 0 else 0)
