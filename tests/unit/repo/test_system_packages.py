"""`make test` and `make demo` bring a fresh machine's distribution packages themselves, from
one list (devstack/system_packages.py); `.ci/run` is nothing but `make test`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from devstack import system_packages
from devstack.system_packages import PROFILES, Requirement, ensure

REPO = Path(__file__).resolve().parents[3]


class Machine:
    """A machine's installed packages, and a runner that records commands and installs."""

    def __init__(self, installed: set[str], *, policy: Path, fail: str | None = None) -> None:
        self.installed = installed
        self.policy = policy
        self.fail = fail
        self.commands: list[list[str]] = []
        self.policy_during_install: list[bool] = []

    def requirement(self, package: str, service: str | None = None) -> Requirement:
        return Requirement(package, f"{package} things", lambda: package in self.installed, service)

    def run(self, command: Sequence[str]) -> int:
        self.commands.append(list(command))
        if self.fail and self.fail in command:
            return 100
        if "install" in command:
            self.policy_during_install.append(self.policy.exists())
            self.installed |= {arg for arg in command[command.index("install") + 1 :]}
        return 0


def test_nothing_missing_runs_nothing_and_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Machine({"java", "maven"}, policy=tmp_path / "policy-rc.d")
    needs = [machine.requirement("java"), machine.requirement("maven")]
    assert ensure(needs, run=machine.run, policy=machine.policy, can_install=True) == 0
    assert machine.commands == []
    assert capsys.readouterr() == ("", "")


def test_as_root_with_apt_it_installs_what_is_missing_with_no_daemon_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Machine({"java"}, policy=tmp_path / "policy-rc.d")
    needs = [
        machine.requirement("java"),
        machine.requirement("postgresql", service="postgresql"),
        machine.requirement("prometheus", service="prometheus"),
    ]
    assert ensure(needs, run=machine.run, policy=machine.policy, can_install=True) == 0
    update, install, *stops = machine.commands
    assert update[0] == "apt-get" and update[-1] == "update"
    assert install[0] == "apt-get" and install[-4:] == [
        "-y",
        "--no-install-recommends",
        "postgresql",
        "prometheus",
    ]
    assert "DPkg::Lock::Timeout=600" in install  # another apt on the machine: wait, don't fail
    # Service starts were forbidden during the install, the policy is gone afterwards, and
    # whatever a permissive policy let start is stopped.
    assert machine.policy_during_install == [True]
    assert not machine.policy.exists()
    assert [" ".join(stop) for stop in stops] == [
        "sh -c invoke-rc.d postgresql stop >/dev/null 2>&1 || true",
        "sh -c invoke-rc.d prometheus stop >/dev/null 2>&1 || true",
    ]
    assert "installing system packages: postgresql" in capsys.readouterr().out


def test_the_machines_own_service_policy_is_left_alone(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")  # e.g. a machine that wants its daemons
    machine = Machine(set(), policy=policy)
    needs = [machine.requirement("maven")]
    assert ensure(needs, run=machine.run, policy=policy, can_install=True) == 0
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def test_without_root_or_apt_one_line_names_the_packages_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Machine({"java"}, policy=tmp_path / "policy-rc.d")
    needs = [machine.requirement("java"), machine.requirement("prometheus")]
    assert ensure(needs, run=machine.run, policy=machine.policy, can_install=False) == 1
    assert machine.commands == []
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "missing system packages: prometheus (prometheus things)" in err
    assert "apt-get install -y prometheus" in err or "install prometheus with" in err


def test_a_failed_install_or_a_package_that_did_not_help_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Machine(set(), policy=tmp_path / "policy-rc.d", fail="update")
    assert ensure([machine.requirement("maven")], run=machine.run, policy=machine.policy) == 1
    assert "apt-get" in capsys.readouterr().err and not machine.policy.exists()

    machine = Machine(set(), policy=tmp_path / "policy-rc.d")
    still = Requirement("maven", "mvn", lambda: False)
    assert ensure([still], run=machine.run, policy=machine.policy, can_install=True) == 1
    assert "still missing after the install: maven" in capsys.readouterr().err


def test_one_list_of_packages_for_the_two_commands() -> None:
    demo = [r.package for r in PROFILES["demo"]]
    test = [r.package for r in PROFILES["test"]]
    assert demo == ["openjdk-17-jre-headless", "maven", "postgresql"]
    assert test == [*demo, "prometheus"]  # promtool and a real Prometheus: the test suite only
    # This machine passes its own checks (make test installed what was missing).
    assert system_packages.missing(PROFILES["test"]) == []
    assert system_packages.missing(PROFILES["venv"]) == []


def _dry_run(target: str) -> list[str]:
    # A make of our own, not the one running these tests (its flags would leak in).
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), target],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("target", "profile", "then"),
    [("test", "test", "pytest"), ("demo", "demo", "devstack.demo")],
)
def test_make_test_and_make_demo_install_system_packages_first(
    target: str, profile: str, then: str
) -> None:
    lines = _dry_run(target)
    check = next(i for i, line in enumerate(lines) if f"system_packages {profile}" in line)
    jars = next(i for i, line in enumerate(lines) if "ensure_jars" in line)  # needs java, mvn
    last = next(i for i, line in enumerate(lines) if then in line)
    assert check < jars < last


def test_ci_does_nothing_but_make_test() -> None:
    script = (REPO / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands == [
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        "started=$(date +%s)",
        """trap 'echo "ci: elapsed $(( $(date +%s) - started ))s"' EXIT""",
        "make test",
    ]
    assert os.access(REPO / ".ci" / "run", os.X_OK)
