"""A throw-away PostgreSQL cluster from the distribution's binaries (initdb + pg_ctl)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devstack.errors import DevstackError
from devstack.processes import require_free_port, tail

USER = "ledger"
PASSWORD = "ledger"  # devstack only; a real deployment takes LEDGER_DATABASE_URL
DATABASE = "ledger"


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<major>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0),
    )
    if versions:
        return versions[-1].parent
    raise DevstackError("PostgreSQL binaries not found (no initdb): apt-get install -y postgresql")


def _as_service_user() -> list[str]:
    # initdb and postgres refuse to run as root; run them as the distribution's postgres user.
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise DevstackError(
            "running as root needs a 'postgres' user: apt-get install -y postgresql"
        ) from exc
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class PostgresServer:
    workdir: Path
    port: int

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()  # postgres and java run with other cwds

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_as_service_user(), *args], capture_output=True, text=True, check=False
        )

    def start(self) -> None:
        require_free_port(self.port, "PostgreSQL")
        bindir = find_bindir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb(bindir)
        started = self._run(
            str(bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir}",
            "start",
        )
        if started.returncode != 0:
            raise DevstackError(
                f"PostgreSQL failed to start on port {self.port}:\n{started.stderr}"
                f"tail of {self.log_file}:\n{tail(self.log_file)}"
            )
        self._create_database(bindir)

    def _initdb(self, bindir: Path) -> None:
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        result = self._run(
            str(bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        pwfile.unlink()
        if result.returncode != 0:
            if "Permission denied" in result.stderr:
                raise DevstackError(
                    f"initdb cannot write {self.datadir}: every parent directory must be "
                    f"traversable by the postgres user\n{result.stderr}"
                )
            raise DevstackError(f"initdb failed:\n{result.stderr}")
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("max_connections = 200\nshared_buffers = 256MB\n")

    def _create_database(self, bindir: Path) -> None:
        result = self._run(
            str(bindir / "createdb"),
            "-h",
            str(self.workdir),
            "-p",
            str(self.port),
            "-U",
            USER,
            DATABASE,
        )
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise DevstackError(f"createdb {DATABASE} failed:\n{result.stderr}")

    def stop(self) -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        result = self._run(
            str(find_bindir() / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"
        )
        if result.returncode != 0 and "Is server running?" not in result.stderr:
            raise DevstackError(f"pg_ctl stop failed:\n{result.stderr}")
