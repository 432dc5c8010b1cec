"""Fixtures of the integration tests that start consumer processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import ConsumerProcess


@pytest.fixture
def processes() -> Iterator[list[ConsumerProcess]]:
    """Consumer processes a test starts: killed at its end if still running."""
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        process.stop_quietly()
