"""The seeded fault schedule and the hand that carries it out.

`plan_faults` draws when each fault happens (seconds after the traffic starts): SIGKILLs of
consumers at random moments, some right after a commit (`kill_after_commit`: the database
notifies when a stored offset moves, and the partition's owner dies before, or while, it
mirrors that offset to Kafka), PostgreSQL restarts (`pg_ctl -m fast` and `-m immediate`), a
broker kill -9 and restart, consumers leaving (SIGTERM) and joining again, and a database
stall: another session holding a lock on `consumer_offsets`. The sleeps here ARE the schedule
(seeded), not synchronisation; whatever waits for an outcome polls it with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.ledger.database import asyncpg_dsn
from tests.chaos.fleet import Fleet
from tests.chaos.services import NOTIFY_CHANNEL, ChaosServices
from tests.integration.harness import Stack


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the traffic starts
    kind: str  # kill | kill_after_commit | postgres_fast | postgres_immediate | broker | leave_join | stall


def plan_faults(
    rng: random.Random,
    *,
    window: float,
    kills: int,
    kills_after_commit: int,
    postgres_modes: tuple[str, ...],
    broker_restarts: int,
    leave_joins: int,
) -> list[Fault]:
    kinds = [
        *["kill"] * (kills - kills_after_commit),
        *["kill_after_commit"] * kills_after_commit,
        *[f"postgres_{mode}" for mode in postgres_modes],
        *["broker"] * broker_restarts,
        *["leave_join"] * leave_joins,
        "stall",
    ]
    rng.shuffle(kinds)
    times = sorted(rng.uniform(1.0, window) for _ in kinds)
    return [Fault(round(at, 2), kind) for at, kind in zip(times, kinds, strict=True)]


@dataclass
class FaultLog:
    """What happened, for the summary."""

    kills: int = 0
    kills_after_commit: int = 0
    kills_before_mirror: int = 0  # the Kafka-committed offset was behind the stored one
    postgres_restarts: list[dict[str, Any]] = field(default_factory=list)
    broker_restarts: list[dict[str, Any]] = field(default_factory=list)
    leaves: list[dict[str, Any]] = field(default_factory=list)  # exit code, seconds
    joins: int = 0
    stall_held: float = 0.0
    exits: list[dict[str, Any]] = field(default_factory=list)  # processes that ended themselves
    events: list[str] = field(default_factory=list)  # a timeline, one line a fault


class FaultHand:
    def __init__(
        self,
        services: ChaosServices,
        fleet: Fleet,
        stack: Stack,
        rng: random.Random,
        stall_seconds: float,
    ) -> None:
        self.services, self.fleet, self.stack, self.rng = services, fleet, stack, rng
        self.stall_seconds = stall_seconds
        self.log = FaultLog()
        self._background: set[asyncio.Task[None]] = set()
        self._t0 = time.monotonic()

    def _note(self, text: str) -> None:
        self.log.events.append(f"{time.monotonic() - self._t0:7.2f}s {text}")

    async def run(self, schedule: list[Fault]) -> None:
        self._t0 = time.monotonic()
        for fault in schedule:
            await asyncio.sleep(max(0.0, self._t0 + fault.at - time.monotonic()))
            await getattr(self, fault.kind.split("_")[0] + "_fault")(fault.kind)
        await self.settle()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a consumer that exited on its own (a second later, as a supervisor would)."""
        while not stop.is_set():
            for slot, member, code in self.fleet.reap():
                self.log.exits.append({"process": member.name, "exit": code})
                self._note(f"{member.name} exited {code} on its own")
                self._later(self._replace(slot, 1.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def settle(self) -> None:
        """Every replacement started, the stall released."""
        while self._background:
            await asyncio.gather(*list(self._background))

    def _later(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _live_slot(self) -> int:
        deadline = time.monotonic() + 30
        while not self.fleet.slots:  # every slot is being replaced: wait for one
            if time.monotonic() > deadline:
                raise RuntimeError("no consumer came back within 30 s")
            await asyncio.sleep(0.1)
        return self.rng.choice(sorted(self.fleet.slots))

    async def _member_slot(self) -> int:
        """A consumer that has joined the group (logged `consuming`): only a member can leave.
        (A SIGTERM in the interpreter's first milliseconds, before any code of ours runs,
        ends a process by the default action: that is no leave.)"""
        deadline = time.monotonic() + 60
        while True:
            joined = [s for s, m in self.fleet.slots.items() if '"consuming"' in m.process.logs()]
            if joined:
                return self.rng.choice(sorted(joined))
            if time.monotonic() > deadline:
                raise RuntimeError("no consumer joined the group within 60 s")
            await asyncio.sleep(0.2)

    async def _replace(self, slot: int, delay: float) -> None:
        await asyncio.sleep(delay)
        member = self.fleet.start(slot)
        self.log.joins += 1
        self._note(f"started {member.name}")

    async def kill_fault(self, kind: str) -> None:
        slot: int | None = None
        if kind == "kill_after_commit":
            slot = await self._owner_after_commit()
        if slot is None:
            if kind == "kill_after_commit":
                self._note("no commit seen within 45 s (a rebalance or an outage): a plain kill")
            slot = await self._live_slot()
        else:
            self.log.kills_after_commit += 1
        member = self.fleet.kill(slot)
        self.log.kills += 1
        self._note(f"SIGKILL {member.name}" + (" right after a commit" if kind != "kill" else ""))
        self._later(self._replace(slot, self.rng.uniform(0.5, 3.0)))

    async def _owner_after_commit(self) -> int | None:
        """Wait (at most 45 s) for a stored offset to move; the slot that owns the partition."""
        moved: asyncio.Queue[int] = asyncio.Queue()
        try:
            conn = await asyncpg.connect(asyncpg_dsn(self.stack.database_url), timeout=5)
        except (OSError, asyncpg.PostgresError):
            return None
        try:
            await conn.add_listener(NOTIFY_CHANNEL, lambda *args: moved.put_nowait(int(args[3])))
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    partition = await asyncio.wait_for(moved.get(), 1)
                    slot = self.fleet.owner(partition)
                    if slot is not None:
                        self._later(self._compare_mirror(partition))
                        return slot
            return None
        finally:
            conn.terminate()

    async def _compare_mirror(self, partition: int) -> None:
        """After the kill: was the commit mirrored to Kafka before the process died?"""
        await asyncio.sleep(0.05)  # the kill itself happens right after this is scheduled
        admin = AIOKafkaAdminClient(bootstrap_servers=self.stack.bootstrap)
        try:
            await asyncio.wait_for(admin.start(), 5)
            committed = await asyncio.wait_for(
                admin.list_consumer_group_offsets(self.stack.group_id), 5
            )
            stored = (await self.stack.stored_offsets()).get(partition, 0)
            mirrored = committed.get(TopicPartition(self.stack.topic, partition))
            if mirrored is None or mirrored.offset < stored:
                self.log.kills_before_mirror += 1
        except Exception:  # noqa: BLE001 - a report for the summary only; faults may spoil it
            pass
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    async def postgres_fault(self, kind: str) -> None:
        mode = kind.removeprefix("postgres_")
        seconds = await asyncio.to_thread(self.services.restart_postgres, mode)
        self.log.postgres_restarts.append({"mode": mode, "seconds": round(seconds, 2)})
        self._note(f"pg_ctl restart -m {mode} ({seconds:.1f} s)")

    async def broker_fault(self, kind: str) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self.services.kill_broker)
        self._note("broker kill -9")
        await asyncio.sleep(self.rng.uniform(1.0, 4.0))  # the outage
        await asyncio.to_thread(self.services.start_broker)
        down = time.monotonic() - started
        self.log.broker_restarts.append({"down_seconds": round(down, 2)})
        self._note(f"broker back ({down:.1f} s down)")

    async def leave_fault(self, kind: str) -> None:
        slot = await self._member_slot()
        member = self.fleet.slots.pop(slot)
        code, seconds = await asyncio.to_thread(member.process.terminate)
        member.ended = f"stopped (exit {code} in {seconds:.1f} s)"
        self.log.leaves.append({"exit": code, "seconds": round(seconds, 2)})
        self._note(f"SIGTERM {member.name}: exit {code} in {seconds:.1f} s")
        self._later(self._replace(slot, self.rng.uniform(1.0, 4.0)))

    async def stall_fault(self, kind: str) -> None:
        self._later(self._hold_offsets_lock())

    async def _hold_offsets_lock(self) -> None:
        """Another session locks consumer_offsets against writes (reads go on) for a while:
        every commit waits behind it."""
        conn = await asyncpg.connect(asyncpg_dsn(self.stack.database_url), timeout=10)
        started = time.monotonic()
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE consumer_offsets IN EXCLUSIVE MODE")
                self._note(f"consumer_offsets locked for {self.stall_seconds:.0f} s")
                await asyncio.sleep(self.stall_seconds)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._note("the lock's session ended early (the database restarted)")
        finally:
            self.log.stall_held = round(time.monotonic() - started, 2)
            conn.terminate()
        self._note("consumer_offsets unlocked")
