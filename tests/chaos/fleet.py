"""The consumers of one group: slots filled by `token-ledger consume` processes, each process
with a log of its own, killed, stopped and replaced by the fault schedule."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import ConsumerProcess


@dataclass
class Member:
    process: ConsumerProcess
    name: str
    ended: str | None = None  # "killed", "stopped (exit N in S s)"


@dataclass
class Fleet:
    env: Callable[[], dict[str, str]]  # a fresh environment (its own metrics port) per process
    logdir: Path
    members: list[Member] = field(default_factory=list)  # every process ever started
    slots: dict[int, Member] = field(default_factory=dict)  # the running ones

    def start(self, slot: int) -> Member:
        name = f"consumer-{len(self.members) + 1:02d}-slot{slot}"
        process = ConsumerProcess(self.env(), self.logdir / f"{name}.log").start()
        member = Member(process, name)
        self.members.append(member)
        self.slots[slot] = member
        return member

    def kill(self, slot: int) -> Member:
        member = self.slots.pop(slot)
        member.process.kill()
        member.ended = "killed"
        return member

    def terminate(self, slot: int) -> tuple[int, float]:
        """SIGTERM: leave the group (exit 0 within 10 s is the contract)."""
        member = self.slots.pop(slot)
        code, seconds = member.process.terminate()
        member.ended = f"stopped (exit {code} in {seconds:.1f} s)"
        return code, seconds

    def reap(self) -> list[tuple[int, Member, int]]:
        """Processes that exited on their own: (slot, member, exit code), their slots freed.

        A consumer that cannot reach the broker when it starts exits 9 (docs/operations.md#exit-codes);
        the fleet restarts it, as a supervisor (systemd, Kubernetes) would."""
        exited = []
        for slot, member in list(self.slots.items()):
            code = member.process.process.poll() if member.process.process else None
            if code is not None:
                del self.slots[slot]
                member.ended = f"exited {code} on its own"
                exited.append((slot, member, code))
        return exited

    def owner(self, partition: int) -> int | None:
        """The slot whose process was last assigned `partition`, by its own log."""
        for slot, member in self.slots.items():
            if partition in _assigned(member.process.logs()):
                return slot
        return None

    def stop_all(self) -> list[tuple[str, int, float]]:
        return [(self.slots[s].name, *self.terminate(s)) for s in sorted(self.slots)]

    def kill_leftovers(self) -> None:
        for member in self.members:
            member.process.stop_quietly()


def _assigned(log: str) -> set[int]:
    owned: set[int] = set()
    for line in log.splitlines():
        if '"partitions ' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "partitions assigned":
            owned = set(entry.get("partitions", []))
        elif entry.get("msg") == "partitions revoked":
            owned -= set(entry.get("partitions", []))
    return owned
