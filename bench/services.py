"""The benchmark's own Kafka broker and PostgreSQL server, on free ports in a scratch directory,
so that nothing else on the machine (another test run, `make services`) shares their load or
their state; and PostgreSQL's CPU time, read from /proc.

PostgreSQL's CPU is the postmaster's own time, the time of every backend it has reaped
(cutime/cstime: a consumer's connections end with it) and the time of its live children
(backends, WAL writer, checkpointer): what one run costs the server, whatever process did it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from devstack.kafka import KafkaBroker
from devstack.postgres import PostgresServer
from devstack.processes import free_port

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Services:
    bootstrap: str
    server_url: str  # SQLAlchemy URL of the server's default database
    postmaster: int

    def database_url(self, name: str) -> str:
        return f"{self.server_url.rpartition('/')[0]}/{name}"

    def postgres_cpu(self) -> float:
        """Seconds of CPU the PostgreSQL server has used so far (see the module docstring)."""
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            # Fields after the command (which may hold spaces) in parentheses.
            fields = stat.rpartition(")")[2].split()
            pid, ppid = int(entry.name), int(fields[1])
            if pid == self.postmaster:
                total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            elif ppid == self.postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / TICKS


@contextmanager
def running_services() -> Iterator[Services]:
    """A throw-away broker and server for the whole benchmark; stopped and deleted after."""
    # Under /tmp: the postgres user must be able to reach the data directory.
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-bench-"))
    os.chmod(workdir, 0o755)
    broker = KafkaBroker(workdir / "kafka", port=free_port(), controller_port=free_port())
    postgres = PostgresServer(workdir / "postgres", port=free_port())
    try:
        broker.start()
        postgres.start()
        postmaster = int((postgres.datadir / "postmaster.pid").read_text().split()[0])
        yield Services(broker.bootstrap, postgres.url, postmaster)
    finally:
        broker.stop(grace_seconds=5.0)
        postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class Databases:
    """Fresh ledger databases, cloned from one migrated template (a migration per run would
    add seconds of alembic to every figure)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.template: str | None = None

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(asyncpg_dsn(self.services.server_url))

    async def fresh(self) -> str:
        """The URL of a new, empty ledger database."""
        admin = await self._admin()
        try:
            if self.template is None:
                self.template = f"bench_template_{uuid.uuid4().hex[:8]}"
                await admin.execute(f'CREATE DATABASE "{self.template}"')
                await asyncio.to_thread(upgrade, self.services.database_url(self.template))
            name = f"bench_{uuid.uuid4().hex[:8]}"
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        finally:
            await admin.close()
        return self.services.database_url(name)

    async def drop(self, url: str) -> None:
        admin = await self._admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')
        finally:
            await admin.close()
