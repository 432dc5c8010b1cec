"""The chaos run's short variant (`make chaos` runs the full one): three consumers of one group
under SIGKILLs (one right after a commit), a PostgreSQL `-m immediate` restart, a broker
kill -9, a leave and join, a database stall and poison from every dead-letter reason; then the
ledger must equal the simulator's expectation row by row, the dead-letter topic hold exactly
the poison, `verify` be clean, no partition stall past the bound, every process end, and no
secret show in logs, dead-letter headers, /metrics or /readyz. About 2 minutes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from tests.chaos.run import SHORT, run_chaos


async def test_short_chaos_run_reconciles_exactly() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-chaos-short-"))
    summary = await run_chaos(dataclasses.replace(SHORT, seed=13), workdir)
    shown = json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1, default=str)
    assert summary["failures"] == [], f"{shown}\nlogs in {workdir / 'logs'}"
    assert summary["kills"] == SHORT.kills and summary["broker_restarts"]
    shutil.rmtree(workdir, ignore_errors=True)
