"""`token-ledger`: parse arguments, load settings, configure logging, call one coroutine.

`app.py` holds the application and its root options; each command module registers its
commands on it when imported here.
"""

from __future__ import annotations

import sys

from consumer.cli.app import app

# isort: off
# Imported for their commands, in the order --help lists them.
from consumer.cli import running, inspecting, dead_letters, budgets, api
# isort: on

__all__ = ["api", "app", "budgets", "dead_letters", "inspecting", "main", "running"]


def main() -> None:
    from consumer.failures import run_cli

    sys.exit(run_cli(app))  # the one place failures become a line and an exit code
