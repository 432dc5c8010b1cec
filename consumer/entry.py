"""The `token-ledger` console script. A SIGTERM from the first instruction on means "exit 0":
before the service installs its own handlers (SPEC section 4: any moment, start-up included),
there is nothing to finish, so loading the CLI is simply abandoned."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _exit_now(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_now)
    from consumer.cli import main as cli_main

    cli_main()
