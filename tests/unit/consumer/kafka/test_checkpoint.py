"""Checkpoints: the offset mirror never holds the ledger up."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from consumer.http.metrics import LedgerMetrics
from consumer.kafka import checkpoint as checkpoint_module
from consumer.kafka.checkpoint import Checkpoints
from consumer.settings import load_settings
from consumer.status import Readiness


class _CoordinatorGone:
    """The Kafka edge of the offset mirror when the group coordinator never answers."""

    async def commit(self, offsets: object) -> None:
        await asyncio.Event().wait()


async def test_the_offset_mirror_gives_up_instead_of_holding_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mirror is for lag tooling only: a commit that hangs must not hold the batch lock
    (every partition) or a shutdown with it."""
    monkeypatch.setattr(checkpoint_module, "MIRROR_SECONDS", 0.05)
    settings = load_settings(database_url="postgresql+asyncpg://ledger@127.0.0.1/ledger")
    checkpoints = Checkpoints(
        settings,
        cast(Any, _CoordinatorGone()),
        cast(Any, None),
        LedgerMetrics(),
        Readiness(stall_seconds=60),
        cast(Any, None),
    )
    checkpoints.positions = {0: 10}
    async with asyncio.timeout(10):  # a hang guard: the mirror itself gives up after 0.05 s
        await checkpoints.mirror()
    assert checkpoints._mirror.down
