"""A small HTTP/1.1 server for a few GET routes, on a port that anyone on the network can reach.

The port must never become a way to starve the ledger of descriptors, memory or time, so a
client gets a bounded share of each, whatever it sends:

- At most `max_connections` connections are open. When all are taken, a new connection
  displaces the oldest one that is still sending its request (a client trickling its headers
  loses its place to a fresh one, so a health probe gets through a slow-client flood); when every
  connection is being answered, the new one is closed at once.
- The request line and headers must arrive within `request_seconds` in all (not per line: a
  client sending a header line every second would otherwise be held for ever) and within
  `max_head_bytes` (431 otherwise). The answer must be taken within `response_seconds`.
- Nothing a client sends or does raises out of a connection: garbage gets 400, other methods
  405, resets and half-closed sockets end the connection quietly.

Every connection closed without being served is reported to `on_rejected(reason)` (a metric).

Why not `asyncio.start_server`: it accepts up to 100 connections per event-loop tick and hands
them to the callback a few ticks later, so a flood holds descriptors before any limit applies.
Here one task accepts one connection at a time and decides about it before accepting the next,
so the open descriptors never exceed the cap by more than the one just accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from consumer.logs import fields

log = logging.getLogger(__name__)

Rejection = Literal["over_capacity", "displaced", "deadline", "too_large", "malformed"]
REJECTIONS: tuple[Rejection, ...] = (
    "over_capacity",  # every connection was being answered: the new one was closed at once
    "displaced",  # still sending its request when the cap was reached: closed for a newer one
    "deadline",  # request line and headers not complete within request_seconds
    "too_large",  # request line and headers over max_head_bytes: 431
    "malformed",  # not an HTTP/1.x request line: 400
)

# Connections waiting in the kernel's accept queue cost the kernel, not our descriptors; a deep
# queue lets a probe wait its turn behind a burst instead of having its SYN dropped.
ACCEPT_BACKLOG = 1024

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")  # tolerate bare LF, as hand-typed requests send
_REQUEST_LINE = re.compile(rb"([A-Za-z]{1,20}) ([\x21-\x7e]+) HTTP/1\.[01]")


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 64
    request_seconds: float = 2.0
    max_head_bytes: int = 8 * 1024
    response_seconds: float = 5.0


@dataclass(frozen=True)
class Request:
    method: str  # GET or HEAD: other methods are answered 405 before a handler sees them
    path: str  # without the query string


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Connection: close\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in self.headers)
            + "\r\n"
        )
        return head.encode("latin-1") + (b"" if head_only else self.body)


Handler = Callable[[Request], Awaitable[Response]]

TOO_LARGE = Response(431, b"request header fields too large\n")
BAD_REQUEST = Response(400, b"bad request\n")
NOT_ALLOWED = Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))


class _HeadTooLargeError(Exception):
    pass


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    reading: bool = True  # still receiving its request line and headers: may be displaced

    def abort(self) -> None:
        self.writer.transport.abort()  # the descriptor is released on the next tick
        if self.task is not None:
            self.task.cancel()


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        limits: HttpLimits | None = None,
        on_rejected: Callable[[Rejection], None] = lambda reason: None,
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits or HttpLimits()
        self._handler = handler
        self._on_rejected = on_rejected
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        # Insertion order is accept order: the first connection still reading is the oldest.
        self._open: dict[_Connection, None] = {}

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def reading_connections(self) -> int:
        """Connections still receiving their request line and headers."""
        return sum(conn.reading for conn in self._open)

    async def start(self) -> None:
        """Listen on host:port (an IP address; port 0 picks a free one). OSError if it cannot."""
        self._listener = _listen(self.host, self.port)
        self.port = self._listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop(self._listener), name="http-accept")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait([self._accepting])
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = [conn.task for conn in self._open if conn.task is not None]
        for conn in list(self._open):
            conn.abort()
        if tasks:
            await asyncio.wait(tasks)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as error:
                # Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): some other part
                # of the process holds them. Retry shortly rather than spin or stop serving.
                if not failing:
                    log.warning("http accept failing", extra=fields(error=str(error)))
                    failing = True
                await asyncio.sleep(0.5)
                continue
            if failing:
                log.info("http accept recovered")
                failing = False
            if not self._make_room():
                sock.close()
                self._on_rejected("over_capacity")
                await asyncio.sleep(0)  # let the connections being answered progress
                continue
            try:
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    # StreamReader stops reading from the socket at twice this much unread data,
                    # which bounds the memory a connection can take.
                    limit=self.limits.max_head_bytes,
                )
            except OSError:
                sock.close()  # the client is gone already
                continue
            except BaseException:
                sock.close()  # no transport owns it (one that did was closed on the way out)
                raise
            conn = _Connection(writer)
            self._open[conn] = None
            conn.task = asyncio.create_task(self._serve(conn, reader), name="http-connection")

    def _make_room(self) -> bool:
        """Whether a new connection may be served, displacing the oldest one still reading
        its request if every slot is taken."""
        if len(self._open) < self.limits.max_connections:
            return True
        oldest_reading = next((conn for conn in self._open if conn.reading), None)
        if oldest_reading is None:
            return False
        del self._open[oldest_reading]  # its slot is free now; its descriptor on the next tick
        oldest_reading.abort()
        self._on_rejected("displaced")
        return True

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        writer = conn.writer
        try:
            answer = await self._answer(conn, reader)
            if answer is not None:
                async with asyncio.timeout(self.limits.response_seconds):
                    writer.write(answer)
                    await writer.drain()
                    writer.close()  # flushes what drain() left buffered, then closes
                    await writer.wait_closed()
        except OSError:
            pass  # reset, broken pipe, or an answer not taken in time (TimeoutError is an OSError)
        except Exception:  # a connection's top boundary: a bug in a route must not end the server
            log.exception("http request failed")
        finally:
            writer.transport.abort()  # drops anything unsent to a client that stopped reading
            with contextlib.suppress(OSError):
                await writer.wait_closed()  # the descriptor is closed once this returns
            self._open.pop(conn, None)

    async def _answer(self, conn: _Connection, reader: asyncio.StreamReader) -> bytes | None:
        """The bytes to send back, or None to close without an answer."""
        try:
            async with asyncio.timeout(self.limits.request_seconds):
                head = await _read_head(reader, self.limits.max_head_bytes)
        except TimeoutError:
            self._on_rejected("deadline")
            return None
        except _HeadTooLargeError:
            self._on_rejected("too_large")
            return TOO_LARGE.encode()
        finally:
            conn.reading = False
        if head is None:
            return None  # the client stopped sending before its request was complete
        request = _parse(head)
        if request is None:
            self._on_rejected("malformed")
            return BAD_REQUEST.encode()
        if request.method not in ("GET", "HEAD"):
            return NOT_ALLOWED.encode()
        response = await self._handler(request)
        return response.encode(head_only=request.method == "HEAD")


async def _read_head(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The request line and headers, without the blank line that ends them; None if the
    client stopped sending first. Raises _HeadTooLargeError past `limit` bytes."""
    head = bytearray()
    while True:
        chunk = await reader.read(limit)
        if not chunk:
            return None
        searched_from = max(0, len(head) - 3)  # the end may straddle two chunks
        head += chunk
        end = _END_OF_HEAD.search(head, searched_from)
        if end is not None:
            if end.start() > limit:
                raise _HeadTooLargeError
            return bytes(head[: end.start()])
        if len(head) > limit:
            raise _HeadTooLargeError


def _parse(head: bytes) -> Request | None:
    line = head.split(b"\n", 1)[0].removesuffix(b"\r")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return None
    method, target = match.group(1).decode("ascii"), match.group(2).decode("ascii")
    return Request(method, target.split("?", 1)[0])


def _listen(host: str, port: int) -> socket.socket:
    address = ipaddress.ip_address(host)
    if address.version == 6:
        sock = socket.create_server(
            (host, port),
            family=socket.AF_INET6,
            backlog=ACCEPT_BACKLOG,
            # `::` means every interface, IPv4 ones included, where the system allows it.
            dualstack_ipv6=address.is_unspecified and socket.has_dualstack_ipv6(),
        )
    else:
        sock = socket.create_server((host, port), backlog=ACCEPT_BACKLOG)
    sock.setblocking(False)
    return sock
