"""HTTP on LEDGER_METRICS_PORT: /metrics (Prometheus), /healthz (alive), /readyz (ready).

Ready means: partitions assigned, the database answers, and not stalled (records waiting
while nothing has been committed for LEDGER_STALL_SECONDS), nor held that long by a transaction
a producer left open (consumer/lag.py). A tiny asyncio server: three GET
routes do not justify a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.lag import Held
from consumer.logs import fields
from consumer.metrics import LedgerMetrics

log = logging.getLogger(__name__)


@dataclass
class Readiness:
    """What the pipeline reports and /readyz judges; times are time.monotonic()."""

    stall_seconds: float
    assigned: frozenset[int] = frozenset()
    lag: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    database_ok: bool = True
    # Not lag (nothing there can be read yet), so judged on its own: partition -> its records
    # waiting for an open transaction, and since when its last stable offset has stood still.
    held: dict[int, Held] = field(default_factory=dict)
    kafka_ok: bool = True
    halted: dict[int, str] = field(default_factory=dict)  # partition -> why it stopped
    unexpected: str | None = None  # the batch is being retried after an unexpected error

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def reasons_not_ready(self) -> list[str]:
        reasons = []
        if not self.assigned:
            reasons.append("no partitions assigned")
        if not self.database_ok:
            reasons.append("database unreachable")
        if not self.kafka_ok:
            reasons.append("Kafka unreachable")
        if self.unexpected:
            reasons.append(f"retrying a batch after an {self.unexpected} (see the log)")
        for partition, why in sorted(self.halted.items()):
            reasons.append(f"partition {partition} stopped: {why}")
        if self.lag > 0 and time.monotonic() - self.last_progress > self.stall_seconds:
            reasons.append(
                f"stalled: {self.lag} records waiting, no commit for {self.stall_seconds:.0f}s"
            )
        if held := {
            p: h for p, h in self.held.items() if time.monotonic() - h.since > self.stall_seconds
        }:
            reasons.append(
                f"open transaction: {sum(h.records for h in held.values())} records wait on"
                f" partition {', '.join(map(str, sorted(held)))} behind a transaction open for"
                f" over {self.stall_seconds:.0f}s (the broker aborts it at the producer's"
                " transaction timeout)"
            )
        return reasons


class HealthServer:
    def __init__(
        self,
        port: int,
        metrics: LedgerMetrics,
        readiness: Readiness,
        ping_database: Callable[[], Awaitable[bool]],
    ) -> None:
        self.port = port
        self.metrics = metrics
        self.readiness = readiness
        self._ping_database = ping_database
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, host="0.0.0.0", port=self.port)  # noqa: S104 - scraped from outside the container
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http listening", extra=fields(port=self.port))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            status, content_type, body = await self._route(path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # a client that hangs up or dawdles gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            self.readiness.database_ok = await self._ping_database()
            reasons = self.readiness.reasons_not_ready()
            self.metrics.ready.set(0 if reasons else 1)
            if reasons:
                return "503 Service Unavailable", "text/plain", ("\n".join(reasons) + "\n").encode()
            return "200 OK", "text/plain", b"ready\n"
        return "404 Not Found", "text/plain", b"not found\n"
