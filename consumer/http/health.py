"""HTTP on LEDGER_METRICS_HOST:LEDGER_METRICS_PORT: /metrics (Prometheus), /healthz (alive),
/readyz (ready); and the readiness watch.

Ready means: partitions assigned, the database answers, and not stalled (records waiting
while nothing has been committed for LEDGER_STALL_SECONDS), nor held that long by a transaction
a producer left open (consumer/kafka/lag.py). The port faces the network, so neither its connections
(consumer/http/server.py bounds them) nor its request rate may reach the ledger's resources:
/readyz reuses a database check at most a second old, and concurrent requests share the one in
flight, so the database sees at most one ping a second from it.

The readiness watch judges the same every second without being asked: it refreshes the lag
(even while a batch is blocked on the database), pings through the same shared check, sets
`token_ledger_ready`, and logs stalls when they start and end (consumer/status.py). A probe is
not needed for the gauge or the log to be true.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.http.metrics import LedgerMetrics
from consumer.http.server import HttpLimits, HttpServer, Request, Response
from consumer.logs import fields
from consumer.settings import PREFIX, SettingsError
from consumer.status import Readiness

log = logging.getLogger(__name__)

DATABASE_CHECK_MAX_AGE = 1.0  # seconds
WATCH_SECONDS = 1.0


class RecentCheck:
    """A yes/no check (the database ping) shared by every caller: an answer is reused while
    its run started less than `max_age` seconds ago, and callers that come while a run is in
    flight wait for that run instead of starting another. Runs: one per `max_age` at most,
    whatever the number of callers."""

    def __init__(
        self,
        check: Callable[[], Awaitable[bool]],
        *,
        max_age: float = DATABASE_CHECK_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self.max_age = max_age
        self._clock = clock
        self._answer: bool | None = None
        self._started_at = 0.0
        self._running: asyncio.Task[bool] | None = None
        self.runs = 0

    async def __call__(self) -> bool:
        if self._answer is not None and self._clock() - self._started_at < self.max_age:
            return self._answer
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name="readiness-check")
        # A caller that goes away (its client hung up) must not cancel the run others await.
        return await asyncio.shield(self._running)

    async def _run(self) -> bool:
        started = self._clock()  # the answer's age counts from here: it may reflect this moment
        self.runs += 1
        try:
            answer = await self._check()
        finally:
            self._running = None
        self._answer, self._started_at = answer, started
        return answer

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            await asyncio.wait([self._running])


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: LedgerMetrics,
        readiness: Readiness,
        ping_database: Callable[[], Awaitable[bool]],
        *,
        limits: HttpLimits | None = None,
        variable: str = f"{PREFIX}METRICS_PORT",  # the setting that names `port`, for errors
        watch: bool = True,  # False: judged only when /readyz is asked (the server's own tests)
    ) -> None:
        self.variable = variable
        self.metrics = metrics
        self.readiness = readiness
        self.database_check = RecentCheck(ping_database)
        # Refreshes what the watch judges (the pipeline's lag), once there is a pipeline.
        self.refresh: Callable[[], Awaitable[object]] | None = None
        self.watch = watch
        self._watch: asyncio.Task[None] | None = None
        self.http = HttpServer(
            host,
            port,
            self._route,
            limits=limits,
            on_rejected=lambda reason: metrics.http_rejected.labels(reason).inc(),
        )

    @property
    def host(self) -> str:
        return self.http.host

    @property
    def port(self) -> int:
        return self.http.port

    async def start(self) -> None:
        """Listen; a host or port that cannot be bound is a configuration error."""
        try:
            await self.http.start()
        except OSError as error:
            port_problem = error.errno in (errno.EADDRINUSE, errno.EACCES)
            variable = self.variable if port_problem else f"{PREFIX}METRICS_HOST"
            raise SettingsError(
                f"{variable}: cannot listen on {self.host} port {self.port}: "
                f"{error.strerror or error}"
            ) from None
        log.info("http listening", extra=fields(host=self.host, port=self.port))
        if self.watch:
            self._watch = asyncio.create_task(self._watch_readiness(), name="readiness-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait([self._watch])
        await self.http.stop()
        await self.database_check.close()

    async def judge(self) -> list[str]:
        """Why not ready (empty: ready), with the database asked at most once a second; the
        ready gauge follows."""
        self.readiness.database_ok = await self.database_check()
        reasons = self.readiness.judge()
        self.metrics.ready.set(0 if reasons else 1)
        return reasons

    async def _watch_readiness(self) -> None:
        failing: str | None = None  # logged once per kind of failure, not once a second
        while True:
            try:
                if self.refresh is not None:
                    await self.refresh()
                await self.judge()
                failing = None
            except Exception as error:
                if type(error).__name__ != failing:
                    failing = type(error).__name__
                    log.warning(
                        "readiness watch failed: retrying every second",
                        extra=fields(error=failing),
                        exc_info=True,
                    )
            await asyncio.sleep(WATCH_SECONDS)

    async def _route(self, request: Request) -> Response:
        if request.path == "/metrics":
            return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if request.path == "/healthz":
            return Response(200, b"ok\n")
        if request.path == "/readyz":
            if reasons := await self.judge():
                return Response(503, ("\n".join(reasons) + "\n").encode())
            return Response(200, b"ready\n")
        return Response(404, b"not found\n")
