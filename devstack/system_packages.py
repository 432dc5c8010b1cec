"""The distribution packages token-ledger needs, and their installation: the only list of them.

    python -m devstack.system_packages venv   # this Python's venv module (Debian splits it off)
    python -m devstack.system_packages demo   # Java + Maven (the Kafka broker), PostgreSQL
    python -m devstack.system_packages test   # ... and Prometheus (promtool, the live test)

`make demo` and `make test` call this first, so the README's two commands work on a fresh
machine. What is missing is installed with apt-get when running as root on Debian/Ubuntu;
otherwise one line names the packages and the command, and the exit code is 1. Nothing is
printed when everything is there.

Debian's packages start their own daemons when installed (a PostgreSQL cluster on 5432,
Prometheus on 9090). Ours run on their own ports and data directories, and the distribution's
would take the ports `make services` uses, so none is started: a policy-rc.d forbids service
starts during the install (unless the machine already has a policy, as Docker images do), and
whatever a permissive policy let start is stopped again.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devstack.errors import DevstackError
from devstack.kafka import cache_dir
from devstack.postgres import find_bindir

# invoke-rc.d and deb-systemd-invoke ask this script before starting a service; 101 = forbidden.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_POLICY = "#!/bin/sh\n# token-ledger: no daemons while installing its packages\nexit 101\n"
APT = ("apt-get", "-q", "-o", "DPkg::Lock::Timeout=600")  # wait for another apt, don't fail


def _on_path(*commands: str) -> Callable[[], bool]:
    return lambda: all(shutil.which(c) is not None for c in commands)


def _maven() -> bool:
    # Maven only resolves the broker's jars; once they are cached it is not needed.
    return shutil.which("mvn") is not None or (cache_dir() / "lib").is_dir()


def _postgresql() -> bool:
    try:
        find_bindir()
    except DevstackError:
        return False
    if os.geteuid() != 0:
        return True
    try:  # as root, initdb and postgres run as the package's `postgres` user
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class Requirement:
    package: str  # the Debian package
    purpose: str  # what it is for, in the line shown to a person
    present: Callable[[], bool]
    service: str | None = None  # the init script the package starts, kept down


JAVA = Requirement("openjdk-17-jre-headless", "java for the Kafka broker", _on_path("java"))
MAVEN = Requirement("maven", "mvn to fetch the Kafka jars", _maven)
POSTGRESQL = Requirement("postgresql", "PostgreSQL binaries", _postgresql, service="postgresql")
PROMETHEUS = Requirement(
    "prometheus",
    "promtool and prometheus for the alert and dashboard tests",
    _on_path("promtool", "prometheus"),
    service="prometheus",
)
# Debian ships `venv` without ensurepip unless pythonX.Y-venv is installed; make's first step
# (`python3 -m venv .tools`) needs it for the interpreter running this.
VENV = Requirement(
    f"python{sys.version_info.major}.{sys.version_info.minor}-venv",
    f"the venv module of {sys.executable}",
    lambda: importlib.util.find_spec("ensurepip") is not None,
)
PROFILES: dict[str, tuple[Requirement, ...]] = {
    "venv": (VENV,),
    "demo": (JAVA, MAVEN, POSTGRESQL),
    "test": (JAVA, MAVEN, POSTGRESQL, PROMETHEUS),
}

Runner = Callable[[Sequence[str]], int]


def _run(command: Sequence[str]) -> int:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, env=env, check=False).returncode


def missing(requirements: Sequence[Requirement]) -> list[Requirement]:
    return [r for r in requirements if not r.present()]


def install_commands(packages: Sequence[str]) -> list[list[str]]:
    # A fresh image has no package lists yet, and stale lists name versions that are gone.
    return [[*APT, "update"], [*APT, "install", "-y", "--no-install-recommends", *packages]]


@contextmanager
def no_service_starts(policy: Path) -> Iterator[None]:
    """Forbid service starts while packages are installed, unless a policy exists already."""
    if policy.exists():  # the machine's own policy decides (Docker images ship one)
        yield
        return
    policy.write_text(_POLICY)
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def _describe(needed: Sequence[Requirement]) -> str:
    return "; ".join(f"{r.package} ({r.purpose})" for r in needed)


def ensure(
    requirements: Sequence[Requirement],
    *,
    run: Runner = _run,
    policy: Path = POLICY_RC_D,
    can_install: bool | None = None,
) -> int:
    """Install what is missing, or say in one line how to; returns the exit code."""
    needed = missing(requirements)
    if not needed:
        return 0
    packages = " ".join(r.package for r in needed)
    if can_install is None:
        can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not can_install:
        how = (
            f"sudo apt-get install -y {packages}"
            if shutil.which("apt-get")
            else f"install {packages} with the system's package manager"
        )
        print(
            f"token-ledger: missing system packages: {_describe(needed)}; run: {how}",
            file=sys.stderr,
        )
        return 1
    print(f"installing system packages: {_describe(needed)}", flush=True)
    with no_service_starts(policy):
        for command in install_commands([r.package for r in needed]):
            if run(command) != 0:
                print(f"token-ledger: `{' '.join(command)}` failed (see above)", file=sys.stderr)
                return 1
    for service in sorted({r.service for r in needed if r.service}):
        # Only a permissive machine policy let it start; the stop is then allowed too.
        run(["sh", "-c", f"invoke-rc.d {service} stop >/dev/null 2>&1 || true"])
    if still := missing(needed):
        print(f"token-ledger: still missing after the install: {_describe(still)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0] not in PROFILES:
        print(f"usage: python -m devstack.system_packages {'|'.join(PROFILES)}", file=sys.stderr)
        return 2
    return ensure(PROFILES[argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
