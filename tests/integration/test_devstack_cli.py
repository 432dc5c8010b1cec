"""`make services` / `make services-down` (python -m devstack up|down) leave nothing running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import free_port

REPO = Path(__file__).resolve().parents[2]


def _devstack(
    workdir: Path, ports: dict[str, str], command: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **ports}
    return subprocess.run(
        [sys.executable, "-m", "devstack", command],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _processes_mentioning(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().split(") ", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if str(path).encode() in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited daemon waits for whoever adopted it to reap it)."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().split(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children_of(pid: int) -> list[int]:
    children = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().split(") ", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                children.append(int(proc.name))
    return children


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(f"/tmp/token-ledger-devstack-{os.getpid()}-{free_port()}")
    path.mkdir()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _kafka_port() -> int:
    """A free port whose next one, the controller's (devstack/__main__.py), is free too: the
    other test worker's services take ports of their own meanwhile."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_up_then_down_leaves_no_process(workdir: Path) -> None:
    ports = {"DEVSTACK_KAFKA_PORT": str(_kafka_port()), "DEVSTACK_PG_PORT": str(free_port())}
    up = _devstack(workdir, ports, "up")
    assert up.returncode == 0, up.stderr
    env_file = (workdir / ".devstack" / "ledger.env").read_text()
    assert f"LEDGER_KAFKA_BOOTSTRAP=127.0.0.1:{ports['DEVSTACK_KAFKA_PORT']}" in env_file
    assert f"@127.0.0.1:{ports['DEVSTACK_PG_PORT']}/ledger" in env_file
    assert "LEDGER_METRICS_HOST=127.0.0.1\n" in env_file
    postmaster = int((workdir / ".devstack/postgres/data/postmaster.pid").read_text().split()[0])
    postgres_children = _children_of(postmaster)
    assert postgres_children, "postgres should have its background workers"
    assert len(_processes_mentioning(workdir)) >= 2  # the broker's JVM and the postmaster

    assert _devstack(workdir, ports, "status").returncode == 0
    down = _devstack(workdir, ports, "down")
    assert down.returncode == 0, down.stderr

    assert _processes_mentioning(workdir) == []
    assert not _running(postmaster)
    assert [pid for pid in postgres_children if _running(pid)] == []
    assert _devstack(workdir, ports, "status").returncode == 1


def test_taken_port_is_named_in_a_clear_error(workdir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        up = _devstack(
            workdir, {"DEVSTACK_KAFKA_PORT": str(port), "DEVSTACK_PG_PORT": str(free_port())}, "up"
        )
    assert up.returncode == 1
    assert f"port 127.0.0.1:{port} is taken" in up.stderr
    assert _processes_mentioning(workdir) == []


def test_missing_java_or_maven_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from devstack.errors import DevstackError
    from devstack.kafka import ensure_jars

    monkeypatch.setenv("TOKEN_LEDGER_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn on it
    with pytest.raises(DevstackError, match="apt-get install openjdk-17-jre-headless"):
        ensure_jars()


def test_a_broker_that_dies_at_start_shows_its_log(workdir: Path) -> None:
    from devstack.errors import DevstackError
    from devstack.kafka import KafkaBroker

    broker = KafkaBroker(workdir / "kafka", port=free_port(), controller_port=free_port())
    broker.start()
    broker.stop(grace_seconds=5)
    meta = workdir / "kafka" / "data" / "meta.properties"
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))  # storage of another node
    with pytest.raises(DevstackError) as error:
        broker.start()
    assert "exited during start-up" in str(error.value)
    assert "tail of" in str(error.value)
    assert "Stored node id 7 doesn't match" in str(error.value)  # the broker's own reason
    assert _processes_mentioning(workdir) == []
