"""Every expected failure of every command is one line and an exit code from the table
(consumer/failures.py, README "Operating it"), run as the real `token-ledger` against the real
broker and PostgreSQL: a wrong password, a missing database, an unmigrated one, one behind or
ahead of the code, a role without privileges, a database or broker that is not there, a
missing topic. No run prints a traceback or the password."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from consumer.failures import ExitCode
from consumer.ledger.database import asyncpg_dsn, create_pool
from consumer.ledger.migrate import upgrade
from consumer.ledger.offsets import last_commit_time
from consumer.ledger.schema import check_database, code_revisions, read_when_usable
from consumer.retry import Backoff
from consumer.settings import load_settings
from consumer.status import Readiness
from devstack.postgres import PostgresServer
from devstack.processes import free_port
from tests.conftest import with_database
from tests.integration.harness import ConsumerProcess, Stack, said, wait_for

HEAD = code_revisions().head  # the revision this release migrates to

DATABASE_COMMANDS = {
    "migrate": ("migrate",),
    "verify": ("verify",),
    "replay": ("replay", "--to-offset", "0"),
    "usage": ("usage",),
    "consume": ("consume", "--until-idle"),
}
KAFKA_COMMANDS = {
    **DATABASE_COMMANDS,
    "dlq list": ("dlq", "list"),
    "dlq replay": ("dlq", "replay"),
    "simulate": ("simulate", "--threads", "1", "--turns", "1"),
}


@dataclass
class Role:
    """A login role with a password that appears nowhere else, to prove it is never printed."""

    name: str
    password: str

    def url(self, database_url: str, *, password: str | None = None) -> str:
        url = make_url(database_url).set(username=self.name, password=password or self.password)
        return url.render_as_string(hide_password=False)


async def _create_role(postgres_url: str, *, member_of_owner: bool) -> Role:
    role = Role(f"op_{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}")
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        await admin.execute(f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}'")
        if member_of_owner:  # acts as the role that migrated the ledger, under its own password
            await admin.execute(f"GRANT {make_url(postgres_url).username} TO {role.name}")
    finally:
        await admin.close()
    return role


async def _drop_role(postgres_url: str, role: Role) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        # What it owns or was granted (e.g. the tables its `migrate` created) goes first.
        databases = await admin.fetch(
            "SELECT DISTINCT d.datname FROM pg_shdepend AS s"
            " JOIN pg_database AS d ON d.oid = s.dbid"
            " WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = $1::regrole",
            role.name,
        )
        for row in databases:
            conn = await asyncpg.connect(asyncpg_dsn(with_database(postgres_url, row["datname"])))
            try:
                await conn.execute(f"DROP OWNED BY {role.name} CASCADE")
            finally:
                await conn.close()
        await admin.execute(f"DROP ROLE IF EXISTS {role.name}")
    finally:
        await admin.close()


@pytest.fixture
async def operator(postgres_url: str) -> AsyncIterator[Role]:
    """May do whatever the ledger's owner may."""
    role = await _create_role(postgres_url, member_of_owner=True)
    yield role
    await _drop_role(postgres_url, role)


@pytest.fixture
async def stranger(postgres_url: str) -> AsyncIterator[Role]:
    """May log in, and nothing else."""
    role = await _create_role(postgres_url, member_of_owner=False)
    yield role
    await _drop_role(postgres_url, role)


async def _set_revision(database_url: str, revision: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("UPDATE alembic_version SET version_num = $1", revision)
    finally:
        await conn.close()


async def _run_all(
    stack: Stack, commands: dict[str, tuple[str, ...]]
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each command as its own `token-ledger` process, side by side."""
    runs = await asyncio.gather(*(asyncio.to_thread(stack.cli, *c) for c in commands.values()))
    return dict(zip(commands, runs, strict=True))


def _assert_one_line(
    name: str, run: subprocess.CompletedProcess[str], code: ExitCode, *mentions: str
) -> None:
    """The exit code, and stderr: the cause in one line (after at most one log line)."""
    output = run.stdout + run.stderr
    lines = [said(line) for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == code, f"{name}: exit {run.returncode}, wanted {code}\n{output}"
    assert 1 <= len(lines) <= 2, f"{name}: {len(lines)} lines on stderr\n{run.stderr}"
    assert lines[-1].startswith("token-ledger: "), f"{name}: {lines[-1]}"
    for mention in mentions:
        assert mention in lines[-1], f"{name}: {mention!r} not in {lines[-1]!r}"
    assert "Traceback" not in output, f"{name}\n{output}"


def _assert_no_secret(role: Role, runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    for name, run in runs.items():
        assert role.password not in run.stdout + run.stderr, name


async def test_wrong_password(kafka_bootstrap: str, ledger_url: str, operator: Role) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    stack = Stack.fresh(kafka_bootstrap, operator.url(ledger_url, password=wrong))
    await stack.create_topic()
    runs = await _run_all(stack, DATABASE_COMMANDS)
    for name, run in runs.items():
        _assert_one_line(
            name, run, ExitCode.DATABASE_CREDENTIALS, "refused the login", "LEDGER_DATABASE_URL"
        )
        assert wrong not in run.stdout + run.stderr, name
    _assert_no_secret(operator, runs)


async def test_database_missing(kafka_bootstrap: str, ledger_url: str, operator: Role) -> None:
    missing = with_database(ledger_url, f"nosuch_{uuid.uuid4().hex[:8]}")
    stack = Stack.fresh(kafka_bootstrap, operator.url(missing))
    await stack.create_topic()
    runs = await _run_all(stack, DATABASE_COMMANDS)
    for name, run in runs.items():
        _assert_one_line(name, run, ExitCode.DATABASE_MISSING, "does not exist", "nosuch_")
    _assert_no_secret(operator, runs)


async def test_database_never_migrated(
    kafka_bootstrap: str, database_url: str, operator: Role
) -> None:
    stack = Stack.fresh(kafka_bootstrap, operator.url(database_url))
    await stack.create_topic()
    runs = await _run_all(stack, {k: v for k, v in DATABASE_COMMANDS.items() if k != "migrate"})
    for name, run in runs.items():
        _assert_one_line(
            name, run, ExitCode.SCHEMA_BEHIND, "no ledger schema", "run `token-ledger migrate`"
        )
    _assert_no_secret(operator, runs)
    # ... and the fix the line names works.
    migrated = stack.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert stack.cli("usage").returncode == 0


async def test_schema_behind_the_code(
    kafka_bootstrap: str, database_url: str, operator: Role
) -> None:
    await asyncio.to_thread(upgrade, database_url, "0001")
    stack = Stack.fresh(kafka_bootstrap, operator.url(database_url))
    await stack.create_topic()
    runs = await _run_all(stack, {k: v for k, v in DATABASE_COMMANDS.items() if k != "migrate"})
    for name, run in runs.items():
        _assert_one_line(
            name,
            run,
            ExitCode.SCHEMA_BEHIND,
            "revision 0001",
            f"needs {HEAD}",
            "token-ledger migrate",
        )
    _assert_no_secret(operator, runs)
    migrated = stack.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert stack.cli("verify").returncode == 0


async def test_revision_no_release_wrote_is_refused(
    kafka_bootstrap: str, ledger_url: str, operator: Role
) -> None:
    await _set_revision(ledger_url, "c0ffee_elsewhere")
    stack = Stack.fresh(kafka_bootstrap, operator.url(ledger_url))
    await stack.create_topic()
    runs = await _run_all(stack, DATABASE_COMMANDS)
    for name, run in runs.items():
        _assert_one_line(
            name, run, ExitCode.SCHEMA_UNKNOWN, "c0ffee_elsewhere", "LEDGER_DATABASE_URL"
        )
    _assert_no_secret(operator, runs)


async def test_schema_ahead_of_the_code_is_used_with_a_warning(
    kafka_bootstrap: str, ledger_url: str, operator: Role
) -> None:
    """A later release migrated the database (rolling deploy, or a rollback): migrations are
    additive, so every command goes on, saying so; `migrate` leaves it as it is."""
    await _set_revision(ledger_url, "9999")
    stack = Stack.fresh(kafka_bootstrap, operator.url(ledger_url))
    await stack.create_topic()
    runs = await _run_all(stack, DATABASE_COMMANDS)
    for name, run in runs.items():
        # replay goes on too, to say this fresh group has no offsets to rewind.
        wanted = ExitCode.CONFIGURATION if name == "replay" else ExitCode.OK
        assert run.returncode == wanted, f"{name}\n{run.stdout}{run.stderr}"
        assert "Traceback" not in run.stderr, name
    assert "has no stored offsets" in said(runs["replay"].stderr.strip().splitlines()[-1])
    for name in ("verify", "replay", "usage", "consume"):
        assert f"revision 9999 is newer than this release's {HEAD}" in runs[name].stderr, name
    assert (
        f"revision 9999 is newer than this release's {HEAD}: left as it is"
        in runs["migrate"].stdout
    )
    _assert_no_secret(operator, runs)
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:  # migrate did not touch it
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == "9999"
    finally:
        await conn.close()


async def test_permission_denied(kafka_bootstrap: str, ledger_url: str, stranger: Role) -> None:
    stack = Stack.fresh(kafka_bootstrap, stranger.url(ledger_url))
    await stack.create_topic()
    runs = await _run_all(stack, DATABASE_COMMANDS)
    for name, run in runs.items():
        _assert_one_line(name, run, ExitCode.PERMISSION_DENIED, "permission denied", "grant")
    _assert_no_secret(stranger, runs)

    # A role that may read but not write: `usage` works, `consume` refuses before it joins the
    # group (inside aiokafka's rebalance listener the error would be swallowed).
    owner = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        await owner.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {stranger.name}")
    finally:
        await owner.close()
    runs = await _run_all(stack, {k: DATABASE_COMMANDS[k] for k in ("usage", "consume")})
    assert runs["usage"].returncode == 0, runs["usage"].stderr
    _assert_one_line(
        "consume", runs["consume"], ExitCode.PERMISSION_DENIED, "chat_messages", "INSERT"
    )


async def test_database_unreachable_for_operator_commands(
    kafka_bootstrap: str, ledger_url: str, operator: Role
) -> None:
    nowhere = make_url(operator.url(ledger_url)).set(port=free_port())
    stack = Stack.fresh(kafka_bootstrap, nowhere.render_as_string(hide_password=False))
    await stack.create_topic()
    runs = await _run_all(stack, {k: v for k, v in DATABASE_COMMANDS.items() if k != "consume"})
    for name, run in runs.items():
        _assert_one_line(
            name, run, ExitCode.DATABASE_UNREACHABLE, "does not answer", f":{nowhere.port}/"
        )
    _assert_no_secret(operator, runs)


async def test_broker_unreachable(ledger_url: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    stack = Stack.fresh(address, ledger_url)
    runs = await _run_all(
        stack, {k: v for k, v in KAFKA_COMMANDS.items() if k not in ("migrate", "usage")}
    )
    for name, run in runs.items():
        _assert_one_line(
            name, run, ExitCode.KAFKA_UNREACHABLE, f"cannot connect to Kafka at {address}"
        )


async def test_topic_missing(kafka_bootstrap: str, ledger_url: str) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)  # topics never created
    commands = {k: KAFKA_COMMANDS[k] for k in ("verify", "replay", "dlq list", "dlq replay")}
    runs = await _run_all(stack, commands)
    for name in ("verify", "replay"):
        _assert_one_line(name, runs[name], ExitCode.TOPIC_MISSING, stack.topic, "LEDGER_TOPIC")
    for name in ("dlq list", "dlq replay"):
        _assert_one_line(
            name, runs[name], ExitCode.TOPIC_MISSING, stack.dlq_topic, "LEDGER_DLQ_TOPIC"
        )


async def test_debug_level_adds_the_traceback(kafka_bootstrap: str, database_url: str) -> None:
    stack = Stack.fresh(kafka_bootstrap, database_url)
    run = await asyncio.to_thread(stack.cli, "usage", LEDGER_LOG_LEVEL="DEBUG")
    assert run.returncode == ExitCode.SCHEMA_BEHIND
    assert "Traceback" in run.stderr
    assert said(run.stderr.strip().splitlines()[-1]).startswith("token-ledger: database ")


# -- consume: a database that is not there yet is waited for --------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, migrated, then stopped (the test starts it)."""
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-pg-late-"))
    server = PostgresServer(workdir, port=free_port())
    server.start()
    upgrade(server.url)
    server.stop()
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


async def test_a_read_at_start_waits_for_a_database_that_stopped_answering(
    own_postgres: PostgresServer,
) -> None:
    """The database answered `check_database`, then restarted before the next read at start
    (a chaos run met this: `consume` exited 11): the read waits for it, not ready meanwhile."""
    await asyncio.to_thread(own_postgres.start)
    settings = load_settings(kafka_bootstrap="127.0.0.1:9", database_url=own_postgres.url)
    readiness = Readiness(600)
    pool = await create_pool(own_postgres.url)
    try:
        assert await check_database(pool, settings) is None
        await asyncio.to_thread(own_postgres.stop)
        read = asyncio.create_task(
            read_when_usable(
                pool,
                settings,
                readiness,
                lambda: last_commit_time(pool, "group", "topic"),
                backoff=Backoff(initial=0.05, maximum=0.2),
            )
        )

        async def not_ready() -> bool:
            return readiness.database_ok is False

        await wait_for(not_ready, within=30, what="not ready while the database is away")
        assert not read.done()
        await asyncio.to_thread(own_postgres.start)
        assert await asyncio.wait_for(read, 60) is None  # nothing committed yet
        assert readiness.database_ok
    finally:
        await pool.close()


async def test_a_transient_failure_of_the_check_is_an_outage_not_an_exit(
    own_postgres: PostgresServer,
) -> None:
    """A statement timeout (SQLSTATE 57014, here while a migration holds the revision table)
    is no answer about the database: `check_database` reports an outage to wait for."""
    await asyncio.to_thread(own_postgres.start)
    settings = load_settings(kafka_bootstrap="127.0.0.1:9", database_url=own_postgres.url)
    dsn = asyncpg_dsn(own_postgres.url)
    holder = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=0, server_settings={"statement_timeout": "200"})
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            outage = await check_database(pool, settings)
        assert outage is not None and "QueryCanceledError" in str(outage)
        assert await check_database(pool, settings) is None  # released: usable
    finally:
        await pool.close()
        await holder.close()


async def test_consume_waits_for_a_database_that_is_not_up_yet(
    kafka_bootstrap: str, own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """Only definite answers stop `consume`: an unreachable database keeps today's behaviour
    (alive, not ready, retrying, logged once), and SIGTERM still exits 0 at once."""
    stack = Stack.fresh(kafka_bootstrap, own_postgres.url)
    await stack.publish([(b"1", b"{not json")])
    consumer = ConsumerProcess(stack.env(), tmp_path / "c.log").start()
    try:
        await wait_for(
            lambda: _says(consumer, '"database unreachable"'),
            within=60,
            what="the outage logged",
            context=consumer.logs,
        )
        assert consumer.http("/healthz")[0] == 200
        status, reasons = consumer.http("/readyz")
        assert status == 503 and "database unreachable" in reasons
        assert consumer.process is not None and consumer.process.poll() is None

        await asyncio.to_thread(own_postgres.start)
        await wait_for(stack.caught_up, within=90, what="the record handled", context=consumer.logs)
        assert consumer.logs().count('"database unreachable"') == 1  # once, not per attempt
        assert '"database reachable again"' in consumer.logs()
        assert len(await stack.dead_letters()) == 1
    finally:
        consumer.stop_quietly()

    await asyncio.to_thread(own_postgres.stop)
    waiting = ConsumerProcess(stack.env(), tmp_path / "w.log").start()
    try:
        await wait_for(
            lambda: _says(waiting, '"database unreachable"'),
            within=60,
            what="the outage logged",
            context=waiting.logs,
        )
        code, seconds = waiting.terminate()
        assert code == 0, waiting.logs()
        assert seconds < 10
    finally:
        waiting.stop_quietly()


async def _says(process: ConsumerProcess, text: str) -> bool:
    return text in process.logs()


async def test_a_missing_topic_stops_consume_when_topics_may_not_be_created(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)  # topics never created
    run = await asyncio.to_thread(
        stack.cli, "consume", "--until-idle", LEDGER_CREATE_TOPICS="false"
    )
    _assert_one_line(
        "consume", run, ExitCode.TOPIC_MISSING, stack.topic, "LEDGER_TOPIC", "CREATE_TOPICS"
    )


async def test_consume_says_which_topics_it_created(kafka_bootstrap: str, ledger_url: str) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)  # topics never created
    run = await asyncio.to_thread(stack.cli, "consume", "--until-idle")
    assert run.returncode == 0, run.stderr
    created = [
        line
        for line in map(json.loads, run.stderr.splitlines())
        if line["msg"].startswith("topic ") and "created it" in line["msg"]
    ]
    said_created = {(line["level"], line["topic"], line["variable"]) for line in created}
    assert said_created >= {
        ("warning", stack.topic, "LEDGER_TOPIC"),
        ("warning", stack.dlq_topic, "LEDGER_DLQ_TOPIC"),
    }
    # The relay beside it creates the billing and budget alert topics on its first pass (which
    # a consumer that is caught up at once may not wait for).
    assert said_created <= {
        ("warning", stack.topic, "LEDGER_TOPIC"),
        ("warning", stack.dlq_topic, "LEDGER_DLQ_TOPIC"),
        ("warning", stack.billing_topic, "LEDGER_BILLING_TOPIC"),
        ("warning", stack.budget_topic, "LEDGER_BUDGET_TOPIC"),
    }
    # Already there: the next start creates nothing, and says nothing about it.
    again = await asyncio.to_thread(stack.cli, "consume", "--until-idle")
    assert again.returncode == 0, again.stderr
    assert "created it" not in again.stderr
