"""Just enough of the Kafka wire protocol to ask a broker whether it is up, and what it is.

Readiness must be proven with a real request, not an open port: ApiVersions (v0) lists the
APIs and version ranges the broker serves, Metadata (v1) names the brokers and the controller.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

API_VERSIONS = 18
METADATA = 3


@dataclass(frozen=True)
class ApiRange:
    min_version: int
    max_version: int


@dataclass(frozen=True)
class ClusterMetadata:
    broker_ids: tuple[int, ...]
    controller_id: int


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        raw = self._data[self._pos : self._pos + length]
        self._pos += length
        return raw.decode()


def _call(
    host: str, port: int, api_key: int, api_version: int, body: bytes, timeout: float
) -> bytes:
    client_id = b"token-ledger-devstack"
    correlation_id = 1
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _recv_exact(sock, 4))[0]
        response = _recv_exact(sock, size)
    if struct.unpack_from(">i", response)[0] != correlation_id:
        raise ConnectionError("Kafka response with an unexpected correlation id")
    return response[4:]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("Kafka broker closed the connection mid-response")
        chunks.extend(chunk)
    return bytes(chunks)


def api_versions(host: str, port: int, timeout: float = 5.0) -> dict[int, ApiRange]:
    """The broker's supported API keys and version ranges (ApiVersions v0)."""
    reader = _Reader(_call(host, port, API_VERSIONS, 0, b"", timeout))
    error_code = reader.take(">h")
    if error_code != 0:
        raise ConnectionError(f"ApiVersions failed with Kafka error code {error_code}")
    ranges: dict[int, ApiRange] = {}
    for _ in range(reader.take(">i")):
        key = reader.take(">h")
        ranges[key] = ApiRange(reader.take(">h"), reader.take(">h"))
    return ranges


def cluster_metadata(host: str, port: int, timeout: float = 5.0) -> ClusterMetadata:
    """Brokers and controller as the broker reports them (Metadata v1, no topics)."""
    reader = _Reader(_call(host, port, METADATA, 1, struct.pack(">i", 0), timeout))
    broker_ids = []
    for _ in range(reader.take(">i")):
        broker_ids.append(reader.take(">i"))
        reader.string()  # host
        reader.take(">i")  # port
        reader.string()  # rack
    return ClusterMetadata(broker_ids=tuple(broker_ids), controller_id=reader.take(">i"))
