"""The chaos run's own broker and database: dedicated instances, so that it can kill them.

The broker has a SASL_PLAINTEXT listener (SCRAM-SHA-256) for the consumers, whose password is
a log canary; the simulator, the monitor and the checks use the plain listener. The database
user's password is a canary too. The ledger database gets, besides the migrations, a
constraint that refuses the corpus's database_rejected marker and a trigger that notifies
`chaos_offsets` whenever a stored offset moves (to kill a consumer right after its commit).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from devstack.kafka import KafkaBroker
from devstack.postgres import DATABASE, USER, PostgresServer
from devstack.processes import free_port, is_alive
from tests.chaos.poison import REFUSING_CONSTRAINT
from tests.integration.harness import restart_postgres

SASL_USER = "ledger-chaos"
NOTIFY_CHANNEL = "chaos_offsets"
_NOTIFY_TRIGGER = f"""
CREATE FUNCTION chaos_offsets_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.partition::text);
  RETURN NEW;
END $$;
CREATE TRIGGER chaos_offsets_moved AFTER INSERT OR UPDATE ON consumer_offsets
  FOR EACH ROW EXECUTE FUNCTION chaos_offsets_moved();
"""


@dataclass
class Secrets:
    """What must never appear in a log line, a dead letter's headers, /metrics or /readyz."""

    sasl_password: str
    database_password: str
    user_query: str
    chat_text: str

    @classmethod
    def for_seed(cls, seed: int) -> Secrets:
        tag = f"{seed:x}"
        return cls(
            sasl_password=f"sasl-canary-{tag}-Vq7Zp",
            database_password=f"db-canary-{tag}-Kx3Wm",
            user_query=f"What is canary {tag} hiding from the logs?",
            chat_text=f"canary chat text {tag} never logged",
        )

    def all(self) -> dict[str, str]:
        return {
            "sasl password": self.sasl_password,
            "database password": self.database_password,
            "user query": self.user_query,
            "chat text": self.chat_text,
        }


class ChaosServices:
    def __init__(self, workdir: Path, secrets: Secrets) -> None:
        self.secrets = secrets
        self.broker = KafkaBroker(
            workdir / "kafka",
            port=free_port(),
            controller_port=free_port(),
            sasl_port=free_port(),
            scram_users={SASL_USER: secrets.sasl_password},
        )
        self.postgres = PostgresServer(workdir / "postgres", port=free_port())

    @property
    def database_url(self) -> str:
        password = self.secrets.database_password
        return f"postgresql+asyncpg://{USER}:{password}@127.0.0.1:{self.postgres.port}/{DATABASE}"

    def consumer_env(self) -> dict[str, str]:
        """The Kafka security settings of the chaos consumers (SASL, with the canary)."""
        return {
            "LEDGER_KAFKA_BOOTSTRAP": self.broker.sasl_bootstrap,
            "LEDGER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "LEDGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "LEDGER_KAFKA_SASL_USERNAME": SASL_USER,
            "LEDGER_KAFKA_SASL_PASSWORD": self.secrets.sasl_password,
        }

    async def start(self) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.broker.start), asyncio.to_thread(self.postgres.start)
        )
        conn = await asyncpg.connect(asyncpg_dsn(self.postgres.url))
        try:  # the devstack password is replaced by the canary
            await conn.execute(f"ALTER ROLE {USER} PASSWORD '{self.secrets.database_password}'")
        finally:
            await conn.close()
        await asyncio.to_thread(upgrade, self.database_url)
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            await conn.execute(REFUSING_CONSTRAINT)
            await conn.execute(_NOTIFY_TRIGGER)
        finally:
            await conn.close()

    def kill_broker(self) -> None:
        """kill -9 of the broker's process group (no shutdown, no flush)."""
        pid = self.broker.pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while is_alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker {pid} survived SIGKILL")
            time.sleep(0.05)
        self.broker.pid = None

    def start_broker(self) -> None:
        """The same ports and data directory: the log is recovered, the cluster is the same."""
        self.broker.start()

    def restart_postgres(self, mode: str) -> float:
        assert mode in ("fast", "immediate")
        return restart_postgres(self.postgres, "fast" if mode == "fast" else "immediate")

    def stop(self) -> None:
        try:
            self.broker.stop(grace_seconds=5.0)
        finally:
            self.postgres.stop()
