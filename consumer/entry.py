"""The `token-ledger` console script. A SIGTERM from the first instruction on means "exit 0":
before the service installs its own handlers (docs/operations.md#stopping: any moment, start-up included),
there is nothing to finish, so loading the CLI is simply abandoned.

`pip install token-ledger` is the lean producer library for chat services; the console script
lands on PATH with it, but the consumer's dependencies (asyncpg, SQLAlchemy, typer, …) come
only with the `consumer` extra. Without them a traceback about a missing module would be the
first thing a chat-service developer sees; one line says what to install instead."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

# Packages of this project: a missing one is a broken install, not a missing extra.
_OWN = frozenset({"consumer", "producer", "migrations"})


def _exit_now(signum: int, frame: FrameType | None) -> None:
    # Not sys.exit: a SystemExit raised while an import is being compiled can be lost (seen
    # about once in 40 signals). Nothing is open yet that needs more than a flush.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_now)
    try:
        from consumer.cli import main as cli_main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing in _OWN:
            raise
        sys.exit(
            f"token-ledger: the consumer's dependencies are not installed (no module "
            f"{missing!r}): pip install 'token-ledger[consumer]'"
        )
    cli_main()
