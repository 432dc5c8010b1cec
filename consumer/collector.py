"""The garbage collector as a long-running consumer wants it (docs/design.md#choices-worth-knowing).

A batch allocates hundreds of thousands of short-lived objects, and reference counting frees
them when it commits: what the cyclic collector finds there is next to nothing, and walking
them costs CPU and pauses. So `consume` collects the young generation only once
YOUNG_THRESHOLD more objects than at the last collection are counted alive (allocations less
frees), which a drain at the default batch size never reaches. Cycles do arise elsewhere, and
slowly: each failed connection attempt during a database outage leaves ~100 cyclic objects (with
`sslmode=verify-full`, an SSL context holding the loaded CA bundle, ~0.8 MiB), each HTTP request
a few. Counting alone would leave them in memory for an hour of outage, so `sweep` collects the
young generation at least every SWEEP_SECONDS as well.
"""

from __future__ import annotations

import asyncio
import gc

# A batch of 2,000 events (the default LEDGER_MAX_BATCH), decoded and folded, keeps ~35,000
# objects the collector counts (tests/unit/consumer/test_collector.py): a batch in flight and
# the next stay far below this. Past ~10,000 events a batch, a collection runs about once a
# batch.
YOUNG_THRESHOLD = 200_000
SWEEP_SECONDS = 10.0


def tune() -> None:
    """What start-up loaded (modules, validators, settings) is never garbage: its cycles are
    collected once, then the rest is frozen out of the collector's sight. Measured on
    100,000-record first drains: the threshold at 20,000 (from 700) took ~10 % off the
    consumer's CPU; at 200,000, the collector's ~0.8 s and its pauses of up to ~35 ms are gone,
    and 3-4 % of the CPU with them."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


async def sweep(every: float = SWEEP_SECONDS) -> None:
    """Collect the young generation every `every` seconds, until cancelled: what an outage or
    the HTTP server leaves in cycles is freed within seconds, not once the count is reached.
    The older generations follow from their own counts (one collection in ten, and so on)."""
    while True:
        await asyncio.sleep(every)
        gc.collect(0)
