"""`make chaos [SEED=n] [SHORT=1]`: one chaos run, its summary printed and written as JSON."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from tests.chaos.run import FULL, SHORT, run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="the variant `make test` runs")
    parser.add_argument("--out", type=Path, help="where to write the summary (JSON)")
    args = parser.parse_args()
    # The runner's own clients (publisher, monitor) lose the broker on purpose: not news.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = dataclasses.replace(SHORT if args.short else FULL, seed=args.seed)
    # Under /tmp: the postgres user must reach the data directory.
    workdir = Path(tempfile.mkdtemp(prefix=f"token-ledger-chaos-{args.seed}-"))
    summary = asyncio.run(run_chaos(config, workdir))
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    out = args.out or Path(f"chaos-summary-{args.seed}.json")
    out.write_text(text + "\n")
    if summary["failures"]:
        print(
            f"chaos run FAILED ({len(summary['failures'])} checks); logs kept in {workdir / 'logs'}"
        )
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"chaos run passed: summary in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
