"""`token-ledger consume` as the child process it is in production, from a given code tree
(the candidate's, or the baseline commit's), measured from outside: wall time from start to
exit, the child's CPU from its rusage (start-up imports included, as an operator pays them),
its peak RSS from /proc, and PostgreSQL's CPU over the same span."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.services import Services

PEAK_POLL_SECONDS = 0.1
PYTHON = sys.executable  # the project's venv: baseline and candidate share the dependencies


@dataclass(frozen=True)
class Tree:
    """A code tree whose consumer is measured: this worktree, or the baseline's export."""

    name: str
    path: Path


@dataclass(frozen=True)
class Drain:
    seconds: float
    cpu_seconds: float  # all consumer processes together
    pg_cpu_seconds: float
    peak_rss_kib: int  # the largest of the processes
    # What the consumer says it sat idle waiting on (its `caught up` line), when it says so:
    # {"postgres": s, "kafka": s}, summed over the processes.
    idle_seconds: dict[str, float] | None = None


@dataclass
class Consumer:
    tree: Tree
    services: Services
    database_url: str
    topic: str
    group: str

    def env(self, metrics_port: int = 0, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        env.update(
            LEDGER_KAFKA_BOOTSTRAP=self.services.bootstrap,
            LEDGER_DATABASE_URL=self.database_url,
            LEDGER_TOPIC=self.topic,
            LEDGER_DLQ_TOPIC=f"{self.topic}.dlq",
            LEDGER_GROUP_ID=self.group,
            LEDGER_METRICS_HOST="127.0.0.1",
            LEDGER_METRICS_PORT=str(metrics_port),
            LEDGER_LOG_LEVEL="INFO",  # the `caught up` line says where the time went
            LEDGER_LOG_FORMAT="json",
            PYTHONPATH=str(self.tree.path),
            **extra,
        )
        return env

    def start(self, *args: str, metrics_port: int = 0) -> tuple[subprocess.Popen[bytes], Path]:
        log = Path(tempfile.mkstemp(prefix=f"bench-{self.tree.name}-", suffix=".log")[1])
        with log.open("wb") as out:
            process = subprocess.Popen(
                [PYTHON, "-m", "consumer", *args],
                cwd=self.tree.path,
                env=self.env(metrics_port),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return process, log

    def run(self, *args: str) -> None:
        """A short command (replay, verify) to completion; raises with its output on failure."""
        result = subprocess.run(
            [PYTHON, "-m", "consumer", *args],
            cwd=self.tree.path,
            env=self.env(),
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args}: exit {result.returncode}\n{result.stdout[-3000:]!r}")

    async def drain(self, processes: int = 1) -> Drain:
        """`consume --until-idle` in `processes` members of one group, until the last exits."""
        return await self.measure(("consume", "--until-idle"), processes)

    async def measure(self, args: tuple[str, ...], processes: int = 1) -> Drain:
        """`token-ledger <args>` in `processes` processes, until the last exits (exit 0)."""
        pg_before = self.services.postgres_cpu()
        started = time.monotonic()
        children = [self.start(*args) for _ in range(processes)]
        peaks = [0] * processes
        pids = [child.pid for child, _ in children]
        watcher = asyncio.create_task(_watch_peaks(pids, peaks))
        waited = await asyncio.gather(
            *(asyncio.to_thread(os.wait4, child.pid, 0) for child, _ in children)
        )
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        seconds = time.monotonic() - started
        pg_cpu = self.services.postgres_cpu() - pg_before
        idle: dict[str, float] | None = {}
        for (child, log), (_, status, _) in zip(children, waited, strict=True):
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode != 0:
                raise RuntimeError(
                    f"{self.tree.name} {args[0]} exited {child.returncode}:\n"
                    + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                )
            said = _idle(log)
            idle = (
                None
                if idle is None or said is None
                else {what: idle.get(what, 0.0) + seconds for what, seconds in said.items()}
            )
            log.unlink()
        return Drain(
            seconds=seconds,
            cpu_seconds=sum(usage.ru_utime + usage.ru_stime for _, _, usage in waited),
            pg_cpu_seconds=pg_cpu,
            peak_rss_kib=max(peaks),
            idle_seconds=idle,
        )


def _idle(log: Path) -> dict[str, float] | None:
    """The idle figures of the process's `caught up` line (a release that logs none: None).
    Another line starts the same way (`caught up: the backlog is applied`, after a long
    backlog) and may come after it: it carries no figures and is passed over."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and str(entry.get("msg", "")).startswith("caught up"):
            figures = {
                key.removeprefix("idle_on_").removesuffix("_seconds"): float(value)
                for key, value in entry.items()
                if key.startswith("idle_on_")
            }
            if figures:
                return figures
    return None


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


async def _watch_peaks(pids: list[int], peaks: list[int]) -> None:
    """Each process's peak RSS (VmHWM), read until it exits. Not rusage's ru_maxrss: after
    fork and exec that keeps the parent's high-water mark (the benchmark's own memory)."""
    while True:
        for index, pid in enumerate(pids):
            peaks[index] = max(peaks[index], _high_water_kib(pid))
        await asyncio.sleep(PEAK_POLL_SECONDS)


def _high_water_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # exited
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def wait_ready(port: int, seconds: float = 60.0) -> None:
    """Until the consumer's /readyz answers 200 (partitions assigned, database answering)."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(_ready, port):
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer never became ready")
        await asyncio.sleep(0.2)


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    if process.wait(timeout=30) != 0:
        raise RuntimeError(f"consumer exited {process.returncode}:\n{log.read_text()[-3000:]}")
    log.unlink()
