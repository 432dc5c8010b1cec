"""The metrics port against hostile clients, in-process on 127.0.0.1 with small limits: the
connection cap (displacing slow clients, refusing the rest), the whole-request deadline, the
header cap, garbage of every kind, and /readyz's shared database check."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.http.health import HealthServer, RecentCheck
from consumer.http.metrics import LedgerMetrics
from consumer.http.server import HttpLimits, HttpServer, Request, Response
from consumer.settings import SettingsError
from consumer.status import Readiness

FAST = HttpLimits(max_connections=4, request_seconds=0.5, max_head_bytes=1024)


class Database:
    """A fake ping: counts calls; `hold()` makes them wait until `release()`."""

    def __init__(self) -> None:
        self.pings = 0
        self.answer = True
        self._open = asyncio.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def ping(self) -> bool:
        self.pings += 1
        await self._open.wait()
        return self.answer


@dataclass
class Served:
    server: HealthServer
    database: Database
    metrics: LedgerMetrics

    @property
    def port(self) -> int:
        return self.server.port

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "token_ledger_http_connections_rejected_total", {"reason": reason}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def serving(limits: HttpLimits = FAST) -> AsyncIterator[Served]:
    database = Database()
    readiness = Readiness(stall_seconds=60, assigned=frozenset({0}))
    metrics = LedgerMetrics()
    server = HealthServer(
        "127.0.0.1", 0, metrics, readiness, database.ping, limits=limits, watch=False
    )
    await server.start()
    try:
        yield Served(server, database, metrics)
    finally:
        await server.stop()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as served:
        yield served


@pytest.fixture(autouse=True)
def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a client does, the server never logs an error (a route raising would)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Poll a condition of the server's own state (it has no event to await for it)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def read_to_end(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything until the server closes; a reset after (or instead of) the answer counts
    as the end."""
    data = bytearray()
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
    return bytes(data)


async def exchange(port: int, request: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):  # the server may close before it all went
            writer.write(request)
            await writer.drain()
            if half_close:
                writer.write_eof()
        return await read_to_end(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer.split(b" ", 2)[1])


def body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


# -- routes ----------------------------------------------------------------------------------


async def test_routes(served: Served) -> None:
    assert body(await exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")) == b"ok\n"
    assert status(await exchange(served.port, b"GET /readyz?verbose=1 HTTP/1.0\r\n\r\n")) == 200
    metrics = await exchange(served.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert b"token_ledger_http_connections_rejected_total" in body(metrics)
    assert status(await exchange(served.port, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
    head = await exchange(served.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert status(head) == 200 and body(head) == b"" and b"Content-Length: 3\r\n" in head
    posted = await exchange(served.port, b"POST /healthz HTTP/1.1\r\n\r\n")
    assert status(posted) == 405 and b"Allow: GET, HEAD\r\n" in posted
    # Bare LF line ends, as a hand-typed request (nc) sends them.
    assert status(await exchange(served.port, b"GET /healthz HTTP/1.1\nHost: x\n\n")) == 200
    # The request complete, then the client's half of the socket closed: still answered.
    assert (
        status(await exchange(served.port, b"GET /healthz HTTP/1.1\r\n\r\n", half_close=True))
        == 200
    )


async def test_the_ready_gauge_is_judged_without_a_probe() -> None:
    database = Database()
    readiness = Readiness(stall_seconds=60)  # nothing assigned yet: not ready
    metrics = LedgerMetrics()
    metrics.ready.set(1)
    server = HealthServer("127.0.0.1", 0, metrics, readiness, database.ping)
    refreshed = 0

    async def refresh() -> None:
        nonlocal refreshed
        refreshed += 1

    server.refresh = refresh
    ready = functools.partial(metrics.registry.get_sample_value, "token_ledger_ready")
    await server.start()
    try:
        await until(lambda: ready() == 0 and refreshed >= 1)
        readiness.assigned = frozenset({0})
        await until(lambda: ready() == 1)  # nobody asked /readyz
        database.answer = False
        await until(lambda: ready() == 0)
    finally:
        await server.stop()
    assert database.pings >= 2


async def test_readyz_says_why_not(served: Served) -> None:
    served.database.answer = False
    answer = await exchange(served.port, b"GET /readyz HTTP/1.1\r\n\r\n")
    assert status(answer) == 503 and body(answer) == b"database unreachable\n"


# -- header cap ------------------------------------------------------------------------------


async def test_headers_over_the_cap_get_431(served: Served) -> None:
    # Many small header lines: each fine, together too many.
    many = b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: 0123456789abcdef\r\n" * 50 + b"\r\n"
    assert len(many) > FAST.max_head_bytes
    assert status(await exchange(served.port, many)) == 431
    # One huge line, never ended: refused once the cap is passed, not read to its end.
    assert status(await exchange(served.port, b"GET /" + b"a" * 1200)) == 431
    # Exactly at the cap is still served.
    line = b"GET /healthz HTTP/1.1\r\n"
    fits = line + b"X: " + b"y" * (FAST.max_head_bytes - len(line) - 3) + b"\r\n\r\n"
    assert len(fits) == FAST.max_head_bytes + 4
    assert status(await exchange(served.port, fits)) == 200
    assert served.rejected("too_large") == 2


async def test_a_flood_of_bytes_is_cut_off(served: Served) -> None:
    answer = await exchange(served.port, b"\x00" * 5_000_000)
    assert answer == b"" or status(answer) == 431  # refused long before the 5 MB were read
    await until(lambda: served.server.http.open_connections == 0)


# -- whole-request deadline ------------------------------------------------------------------


async def test_the_deadline_covers_the_whole_request_not_each_line(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\n")

    async def trickle() -> None:
        # A header line every 0.1 s: a per-line timeout of 0.5 s would wait for ever.
        with contextlib.suppress(ConnectionError):
            for n in range(100):
                await asyncio.sleep(0.1)
                writer.write(b"X-Slow-%d: 1\r\n" % n)
                await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        assert await read_to_end(reader) == b""  # closed without an answer
    finally:
        trickling.cancel()
        await asyncio.wait([trickling])
        writer.close()
    elapsed = time.monotonic() - started
    assert FAST.request_seconds - 0.05 <= elapsed < FAST.request_seconds + 1.0
    assert served.rejected("deadline") == 1
    await until(lambda: served.server.http.open_connections == 0)


async def test_a_client_that_sends_nothing_is_closed_at_the_deadline(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    started = time.monotonic()
    assert await read_to_end(reader) == b""
    assert time.monotonic() - started < FAST.request_seconds + 1.0
    writer.close()


async def test_an_answer_not_taken_in_time_is_dropped() -> None:
    """A client that asks and never reads cannot hold its connection with a full buffer."""
    big = Response(200, b"x" * 50_000_000)

    async def handler(request: Request) -> Response:
        return big

    limits = HttpLimits(max_connections=4, request_seconds=1, response_seconds=0.3)
    server = HttpServer("127.0.0.1", 0, handler, limits=limits)
    await server.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        sock.send(b"GET / HTTP/1.1\r\n\r\n")
        await until(lambda: server.open_connections == 1)
        await until(lambda: server.open_connections == 0, within=limits.response_seconds + 2)
        sock.close()
    finally:
        await server.stop()


# -- connection cap --------------------------------------------------------------------------


async def _slow_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the end of its headers
    await writer.drain()
    return reader, writer


async def test_at_the_cap_a_new_client_displaces_the_oldest_slow_one() -> None:
    async with serving(HttpLimits(max_connections=4, request_seconds=30)) as served:
        slow = [await _slow_client(served.port) for _ in range(4)]
        await until(lambda: served.server.http.open_connections == 4)

        assert status(await exchange(served.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200
        assert await read_to_end(slow[0][0], within=2) == b""  # the oldest lost its place
        assert served.rejected("displaced") == 1
        assert served.server.http.open_connections == 3  # the other three are still waited for

        for _, writer in slow:
            writer.close()


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_closed_at_once() -> None:
    async with serving(HttpLimits(max_connections=4, request_seconds=30)) as served:
        served.database.hold()  # /readyz waits for the database: these four are busy answering
        waiting = [
            asyncio.create_task(exchange(served.port, b"GET /readyz HTTP/1.1\r\n\r\n"))
            for _ in range(4)
        ]
        await until(lambda: served.database.pings == 1 and served.server.http.open_connections == 4)
        await until(lambda: served.server.http.reading_connections == 0)

        started = time.monotonic()
        assert await exchange(served.port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""
        assert time.monotonic() - started < 1
        assert served.rejected("over_capacity") == 1

        served.database.release()
        answers = await asyncio.gather(*waiting)
        assert [status(a) for a in answers] == [200] * 4
        assert served.database.pings == 1  # the four shared one ping


async def test_a_slow_client_flood_never_holds_more_than_the_cap() -> None:
    limits = HttpLimits(max_connections=8, request_seconds=30)
    async with serving(limits) as served:
        peak = 0
        clients = []
        for _ in range(60):
            clients.append(await _slow_client(served.port))
            peak = max(peak, served.server.http.open_connections)
        probe = await exchange(served.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status(probe) == 200
        assert peak <= limits.max_connections
        assert served.rejected("displaced") >= 60 - limits.max_connections
        for _, writer in clients:
            writer.close()


async def test_stop_closes_every_connection() -> None:
    async with serving(HttpLimits(max_connections=4, request_seconds=30)) as served:
        slow = [await _slow_client(served.port) for _ in range(3)]
        await until(lambda: served.server.http.open_connections == 3)
    assert served.server.http.open_connections == 0
    for reader, writer in slow:
        assert await read_to_end(reader, within=2) == b""
        writer.close()


# -- whatever a client sends -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"", None),  # connects, sends nothing, half-closes
        (b"\x00\x01\x02\xff" * 100, None),  # never ends a request
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", None),  # stops before the blank line
        (b"\xff\xfe\xfd\r\n\r\n", 400),
        ("GET /caf\u00e9 HTTP/1.1\r\n\r\n".encode(), 400),  # non-ASCII target
        ("GET /\u65e5\u672c HTTP/1.1".encode("utf-16") + b"\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Bin: \xff\xfe\x00\x80\r\n\r\n", 200),  # headers not read
        (b"GET /healthz\r\n\r\n", 400),  # HTTP/0.9
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),  # HTTP/2 preface
        (b"\r\n\r\n", 400),
        (b"GET  /healthz  HTTP/1.1\r\n\r\n", 400),
        (b"get /healthz HTTP/1.1\r\n\r\n", 405),
        (b"GET /healthz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n", 200),  # pipelined: one
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", 431),
    ],
)
async def test_whatever_a_client_sends_it_gets_an_answer_or_a_close(
    served: Served, request_bytes: bytes, expected: int | None
) -> None:
    answer = await exchange(served.port, request_bytes, half_close=True)
    if expected is None:
        assert answer == b""
    else:
        assert status(answer) == expected
    await until(lambda: served.server.http.open_connections == 0)


async def test_a_reset_in_the_middle_of_a_request(served: Served) -> None:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    sock.send(b"GET /healthz HTTP/1.1\r\nX: ")
    await until(lambda: served.server.http.open_connections == 1)
    # SO_LINGER with a zero timeout: close() sends a RST instead of a FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    await until(lambda: served.server.http.open_connections == 0)
    assert status(await exchange(served.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200


async def test_a_reset_while_the_answer_is_pending(served: Served) -> None:
    served.database.hold()
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    sock.send(b"GET /readyz HTTP/1.1\r\n\r\n")
    await until(lambda: served.database.pings == 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    served.database.release()
    await until(lambda: served.server.http.open_connections == 0)


@settings(max_examples=100, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=3000),
        st.lists(
            st.sampled_from(
                [
                    *(b"GET", b"HEAD", b" ", b"/healthz", b"/readyz", b"HTTP/1.1", b"\r\n"),
                    *(b"\n", b"\r", b"\x00", b"\xff", b":", b"Host: x", b"?", b"\xc3\xa9"),
                ]
            ),
            max_size=40,
        ).map(b"".join),
    ),
    half_close=st.booleans(),
)
async def test_random_bytes_never_break_the_server(payload: bytes, half_close: bool) -> None:
    # A short deadline: most random payloads never end a request.
    async with serving(HttpLimits(max_connections=4, request_seconds=0.05)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
            if half_close:
                writer.write_eof()
        answer = await read_to_end(reader)  # within the deadline, whatever was sent
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert answer == b"" or status(answer) in {200, 400, 404, 405, 431}
        await until(lambda: served.server.http.open_connections == 0)


# -- /readyz and the database ----------------------------------------------------------------


async def test_readyz_pings_the_database_at_most_once_a_second(served: Served) -> None:
    started = time.monotonic()
    for _ in range(300):
        assert status(await exchange(served.port, b"GET /readyz HTTP/1.1\r\n\r\n")) == 200
    elapsed = time.monotonic() - started
    assert 1 <= served.database.pings <= int(elapsed) + 1


async def test_a_recent_check_is_shared_and_reused() -> None:
    now = [100.0]
    runs = 0
    gate = asyncio.Event()

    async def check() -> bool:
        nonlocal runs
        runs += 1
        await gate.wait()
        return True

    recent = RecentCheck(check, max_age=1.0, clock=lambda: now[0])
    callers = [asyncio.create_task(recent()) for _ in range(200)]
    await until(lambda: runs == 1)
    callers[0].cancel()  # one caller going away does not cancel the run the others wait for
    gate.set()
    answers = await asyncio.gather(*callers[1:])
    assert answers == [True] * 199 and runs == 1

    now[0] += 0.9
    assert await recent() is True and runs == 1  # 0.9 s old: reused
    now[0] += 0.2
    assert await recent() is True and runs == 2  # 1.1 s old: checked again


async def test_a_failed_check_is_not_cached_as_success() -> None:
    answers = iter([False, True])

    async def check() -> bool:
        return next(answers)

    now = [0.0]
    recent = RecentCheck(check, max_age=1.0, clock=lambda: now[0])
    assert await recent() is False
    assert await recent() is False  # a second later at most, the database is asked again
    now[0] += 1.0
    assert await recent() is True


# -- listening -------------------------------------------------------------------------------


async def test_a_taken_port_names_the_port_variable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = HealthServer("127.0.0.1", port, LedgerMetrics(), Readiness(60), Database().ping)
        with pytest.raises(SettingsError, match=r"^LEDGER_METRICS_PORT: cannot listen"):
            await server.start()


async def test_an_address_not_on_this_host_names_the_host_variable() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to an interface.
    server = HealthServer("192.0.2.1", 0, LedgerMetrics(), Readiness(60), Database().ping)
    with pytest.raises(SettingsError, match=r"^LEDGER_METRICS_HOST: cannot listen") as error:
        await server.start()
    assert "\n" not in str(error.value)


async def test_listens_on_ipv6_loopback_when_there_is_one() -> None:
    server = HttpServer("::1", 0, _ok)
    try:
        await server.start()
    except OSError as error:
        if error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            pytest.skip("no IPv6 loopback on this machine")
        raise
    try:
        reader, writer = await asyncio.open_connection("::1", server.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert status(await read_to_end(reader)) == 200
        writer.close()
    finally:
        await server.stop()


async def _ok(request: Request) -> Response:
    return Response(200, b"ok\n")
