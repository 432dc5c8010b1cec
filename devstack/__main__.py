"""`python -m devstack up|down|status`: the long-lived services behind `make services`.

State lives in ./.devstack (data, logs, pid files); `up` writes .devstack/ledger.env with the
LEDGER_* variables that point the consumer at these services.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devstack.errors import DevstackError
from devstack.kafka import KafkaBroker
from devstack.postgres import PostgresServer
from devstack.processes import is_alive, read_pid, stop_process_group

STATE = Path(".devstack")
CONSUMER_PID = STATE / "consumer.pid"  # the consumer `make demo` leaves running


def _services() -> tuple[KafkaBroker, PostgresServer]:
    kafka_port = int(os.environ.get("DEVSTACK_KAFKA_PORT", "9092"))
    broker = KafkaBroker(STATE / "kafka", port=kafka_port, controller_port=kafka_port + 1)
    broker.pid = read_pid(broker.pid_file)
    postgres = PostgresServer(
        STATE / "postgres", port=int(os.environ.get("DEVSTACK_PG_PORT", "5432"))
    )
    return broker, postgres


def _postgres_running(postgres: PostgresServer) -> bool:
    pid_file = postgres.datadir / "postmaster.pid"
    return pid_file.exists() and is_alive(int(pid_file.read_text().split()[0]))


def up() -> None:
    broker, postgres = _services()
    if broker.pid is not None and is_alive(broker.pid):
        print(f"kafka     already running (pid {broker.pid})")
    else:
        broker.pid = None
        print("kafka     starting (first run fetches the jars with Maven)...", flush=True)
        broker.start()
    if _postgres_running(postgres):
        print("postgres  already running")
    else:
        postgres.start()
    env = STATE / "ledger.env"
    env.write_text(
        f"LEDGER_KAFKA_BOOTSTRAP={broker.bootstrap}\nLEDGER_DATABASE_URL={postgres.url}\n"
        # The services listen on 127.0.0.1 only; so does a consumer started with this file.
        "LEDGER_METRICS_HOST=127.0.0.1\n"
    )
    print(f"kafka     {broker.bootstrap}   (log: {broker.log_file})")
    print(f"postgres  {postgres.url}   (log: {postgres.log_file})")
    print(f"env       {env}")


def stop_consumer() -> None:
    pid = read_pid(CONSUMER_PID)
    if pid is not None and is_alive(pid):
        stop_process_group(pid, grace_seconds=15)
    CONSUMER_PID.unlink(missing_ok=True)


def down() -> None:
    stop_consumer()
    broker, postgres = _services()
    broker.stop()
    postgres.stop()
    print("devstack stopped")


def status() -> int:
    broker, postgres = _services()
    kafka_up = broker.pid is not None and is_alive(broker.pid)
    pg_up = _postgres_running(postgres)
    print(f"kafka     {'up ' + broker.bootstrap if kafka_up else 'down'}")
    print(f"postgres  {'up ' + postgres.url if pg_up else 'down'}")
    return 0 if kafka_up and pg_up else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args()
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        else:
            return status()
    except DevstackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
