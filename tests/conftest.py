"""Session-wide real services for integration tests.

A throw-away Kafka broker and PostgreSQL cluster are started on free ports the first time a
test asks for one (and stopped at the end of the session), unless LEDGER_KAFKA_BOOTSTRAP /
LEDGER_DATABASE_URL point at running ones. Each test gets its own topics and its own database.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from devstack.kafka import KafkaBroker
from devstack.postgres import PostgresServer
from devstack.processes import free_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


def _scratch(prefix: str) -> Path:
    # Under /tmp, not pytest's 0700 tmp dir: the postgres user must be able to reach it.
    return Path(tempfile.mkdtemp(prefix=f"token-ledger-{prefix}-"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if bootstrap := os.environ.get("LEDGER_KAFKA_BOOTSTRAP"):
        yield bootstrap
        return
    workdir = _scratch("kafka")
    broker = KafkaBroker(workdir, port=free_port(), controller_port=free_port())
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop(grace_seconds=5.0)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of the session's server (its default database)."""
    if url := os.environ.get("LEDGER_DATABASE_URL"):
        yield url
        return
    workdir = _scratch("postgres")
    server = PostgresServer(workdir, port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


async def _fresh_database(postgres_url: str, template: str = "template1") -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield with_database(postgres_url, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    async for url in _fresh_database(postgres_url):
        yield url


@pytest.fixture(scope="session")
async def ledger_template(postgres_url: str) -> AsyncIterator[str]:
    """A database migrated to head once per session, cloned for each test that needs one."""
    async for url in _fresh_database(postgres_url):
        await asyncio.to_thread(upgrade, url)
        yield url.rpartition("/")[2]


@pytest.fixture
async def ledger_url(postgres_url: str, ledger_template: str) -> AsyncIterator[str]:
    """A fresh database with the ledger schema (alembic head), dropped afterwards."""
    async for url in _fresh_database(postgres_url, template=ledger_template):
        yield url


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh ledger database."""
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def kafka_admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@pytest.fixture
async def topic(kafka_admin: AIOKafkaAdminClient) -> AsyncIterator[str]:
    """A new single-partition topic, unique to the test, deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    await kafka_admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    yield name
    await kafka_admin.delete_topics([name])
