"""Is this database a ledger this release can use? Checked before any command touches it.

The database's alembic revision (one row of `alembic_version`, read with asyncpg: alembic's
migration machinery stays off the start path; only its script directory is read, to learn the
revisions this release knows) against the release's head:

    the database's revision             what every command does
    ----------------------------------  ---------------------------------------------------
    the head                            go on
    an older revision of this release   refuse: SchemaBehindError, "run token-ledger migrate"
    none (no alembic_version row)       refuse: SchemaBehindError, the schema is missing
    a later revision (numbered past     go on, with a WARNING: a newer release migrated it.
      the head)                         Migrations are additive (new tables, new columns
                                        with defaults), so this release's statements still
                                        hold: old consumers keep running through a rolling
                                        deploy, and a rollback can start again
    anything else                       refuse: SchemaUnknownError (several heads, or an id
                                        that no ledger release wrote)

"Later" is decidable without the newer release's files because revision ids are sequence
numbers ("0001", "0002", ...) on one linear chain: tests/unit/consumer/ledger/test_schema_revisions.py keeps
it so. A migration that would break an older release (dropping or renaming what it uses)
needs a coordinated stop of the old consumers instead; none exists so far.

`consume` additionally checks, before joining the group, that its role may write every ledger
table (a batch would otherwise only learn it inside aiokafka's rebalance listener, which logs
and swallows exceptions). A database that does not answer yet is waited for, as at any other
time; only a definite answer (refused login, no database, wrong schema, no privilege) stops it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import asyncpg

from consumer.failures import (
    DatabaseUnreachableError,
    OperatorError,
    PermissionDeniedError,
    SchemaBehindError,
    SchemaUnknownError,
    database_name,
    translate_database_error,
)
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import MIGRATIONS, upgrade
from consumer.logs import fields
from consumer.retry import Backoff, as_transient
from consumer.settings import Settings
from consumer.status import Outage, Readiness

log = logging.getLogger(__name__)
_NUMBERED = re.compile(r"\d+")
# A migration file's `revision: str = "0009"` and `down_revision: str | None = "0008"` (or None).
_REVISION = re.compile(r"^revision(?:: *str)? *= *[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN_REVISION = re.compile(
    r"^down_revision(?:: *[\w |\[\],]+)? *= *(None|[\"']([^\"']+)[\"'])", re.MULTILINE
)
# The tables of consumer/ledger/models.py that the consumer writes: all but the usage API's
# keys. Named here, not read from the models, so that a command's start does not import
# SQLAlchemy; tests/unit/consumer/ledger/test_schema_revisions.py holds the two equal.
CONSUMER_TABLES = frozenset(
    {
        "applied_records",
        "billing_outbox",
        "budget_alert_outbox",
        "budget_periods",
        "budget_states",
        "budgets",
        "chat_messages",
        "chat_threads",
        "consumer_offsets",
        "dead_lettered",
        "partition_halts",
        "token_usage",
    }
)
START_BACKOFF = Backoff(initial=0.2, maximum=5.0)
T = TypeVar("T")
ATTEMPT_SECONDS = 10.0


class SchemaState(StrEnum):
    CURRENT = "current"
    BEHIND = "behind"
    MISSING = "missing"
    AHEAD = "ahead"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Revisions:
    """The migrations this release carries, oldest first; the last is the head."""

    chain: tuple[str, ...]

    @property
    def head(self) -> str:
        return self.chain[-1]

    def judge(self, found: list[str]) -> SchemaState:
        """Where a database whose alembic_version holds `found` stands against this release."""
        if not found:
            return SchemaState.MISSING
        if len(found) > 1:  # branches: no ledger release ever made them
            return SchemaState.UNKNOWN
        (revision,) = found
        if revision == self.head:
            return SchemaState.CURRENT
        if revision in self.chain:
            return SchemaState.BEHIND
        if _NUMBERED.fullmatch(revision) and int(revision) > int(self.head):
            return SchemaState.AHEAD
        return SchemaState.UNKNOWN


@functools.cache
def code_revisions() -> Revisions:
    """Read once per process from migrations/versions (files only: no database, no env.py)."""
    return read_revisions(MIGRATIONS)


def read_revisions(migrations: Path) -> Revisions:
    """Each file's `revision` and `down_revision` lines, linked into the chain: alembic's own
    script directory costs every command ~0.3 s of CPU at start, so it reads them only when a
    file does not state them plainly or they do not make one chain
    (tests/unit/consumer/ledger/test_schema_revisions.py holds the two readings equal)."""
    after: dict[str | None, str] = {}
    for path in (migrations / "versions").glob("*.py"):
        if path.name.startswith(("_", ".")):  # __init__.py, an editor's lock file
            continue
        text = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(text), _DOWN_REVISION.search(text)
        if revision is None or down is None or down[2] in after:
            return _alembic_revisions(migrations)  # not stated plainly, or a branch
        after[down[2]] = revision[1]
    chain: list[str] = []
    while (following := after.get(chain[-1] if chain else None)) is not None:
        chain.append(following)
    if len(chain) != len(after):
        return _alembic_revisions(migrations)  # links that do not make one chain from the first
    return Revisions(tuple(chain))


def _alembic_revisions(migrations: Path) -> Revisions:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations))
    newest_first = [revision.revision for revision in script.walk_revisions()]
    return Revisions(tuple(reversed(newest_first)))


async def database_revisions(conn: asyncpg.Connection) -> list[str]:
    """alembic_version's rows; empty when the database was never migrated."""
    try:
        rows = await conn.fetch("SELECT version_num FROM alembic_version ORDER BY 1")
    except asyncpg.UndefinedTableError:
        return []
    return [row["version_num"] for row in rows]


def _refusal(state: SchemaState, found: list[str], settings: Settings) -> OperatorError | None:
    revisions = code_revisions()
    where = database_name(settings)
    if state is SchemaState.MISSING:
        return SchemaBehindError(
            f"database {where} has no ledger schema: run `token-ledger migrate`"
        )
    if state is SchemaState.BEHIND:
        return SchemaBehindError(
            f"database {where} is at schema revision {found[0]}, this release needs "
            f"{revisions.head}: run `token-ledger migrate`"
        )
    if state is SchemaState.UNKNOWN:
        return SchemaUnknownError(
            f"database {where} is at schema revision {', '.join(found)}, which no release up "
            f"to this one ({revisions.head}) wrote: check that {settings.database_variable} "
            "names the ledger's database, or deploy the release that migrated it"
        )
    return None


async def check_revision(conn: asyncpg.Connection, settings: Settings) -> SchemaState:
    """Raise unless the schema is the head or a later revision (which is logged)."""
    found = await database_revisions(conn)
    state = code_revisions().judge(found)
    if refusal := _refusal(state, found, settings):
        raise refusal
    if state is SchemaState.AHEAD:
        head = code_revisions().head
        log.warning(
            f"database schema revision {found[0]} is newer than this release's {head}: going "
            "on (migrations are additive); upgrade this release",
            extra=fields(database_revision=found[0], code_revision=head),
        )
    return state


def migrate(settings: Settings, revision: str = "head") -> str:
    """`token-ledger migrate`: look at the revision first (asyncpg, so that a refused login or
    a missing database is the same one line as for every command), then let alembic migrate.
    A schema newer than this release is left as it is (exit 0: a rollback's migrate step must
    not fail); a revision no release wrote is refused."""

    async def look() -> list[str]:
        conn = await asyncpg.connect(asyncpg_dsn(settings.database_url.get_secret_value()))
        try:
            return await database_revisions(conn)
        finally:
            await conn.close()

    found = asyncio.run(look())
    state = code_revisions().judge(found)
    if state is SchemaState.UNKNOWN:
        refusal = _refusal(state, found, settings)
        assert refusal is not None
        raise refusal
    if state is SchemaState.AHEAD:
        head = code_revisions().head
        if revision != "head":
            raise SchemaUnknownError(
                f"database {database_name(settings)} is at schema revision {found[0]}, newer "
                f"than this release ({head}): it cannot migrate it to {revision}"
            )
        return (
            f"database schema revision {found[0]} is newer than this release's {head}: "
            "left as it is"
        )
    upgrade(settings.database_url.get_secret_value(), revision)
    return f"database migrated to {revision}"


# What a consumer does to each ledger table (store.py): read registers, upsert rows, advance
# offsets; bigserial ids need their sequences. has_table_privilege() with a list is true if ANY
# is held, hence one call per privilege; the CASE keeps has_sequence_privilege() off other
# relations whatever order the planner evaluates the conditions in.
_MISSING_PRIVILEGES = """
SELECT t.relname FROM pg_class AS t
WHERE t.relnamespace = current_schema()::regnamespace AND t.relkind = 'r'
  AND t.relname = ANY($1::text[])
  AND NOT (has_table_privilege(t.oid, 'SELECT') AND has_table_privilege(t.oid, 'INSERT')
           AND has_table_privilege(t.oid, 'UPDATE')
           -- the relay prunes published revisions; a new owner clears a partition's halt
           AND (t.relname NOT IN ('billing_outbox', 'budget_alert_outbox', 'partition_halts')
                OR has_table_privilege(t.oid, 'DELETE')))
UNION ALL
SELECT s.relname FROM pg_class AS s
JOIN pg_depend AS d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
JOIN pg_class AS t ON t.oid = d.refobjid
WHERE s.relkind = 'S' AND d.deptype IN ('a', 'i')
  AND t.relnamespace = current_schema()::regnamespace AND t.relname = ANY($1::text[])
  AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(s.oid, 'USAGE') END
ORDER BY 1
"""


async def check_consumer_privileges(conn: asyncpg.Connection, settings: Settings) -> None:
    tables = sorted(CONSUMER_TABLES)
    if missing := [row["relname"] for row in await conn.fetch(_MISSING_PRIVILEGES, tables)]:
        raise PermissionDeniedError(
            f"database {database_name(settings)}: the role may not read and write "
            f"{', '.join(missing)}: grant SELECT, INSERT, UPDATE on the ledger tables (and "
            "DELETE on billing_outbox, budget_alert_outbox and partition_halts) and USAGE on their sequences (or use "
            "the role that migrated them)"
        )


async def connect_checked(settings: Settings) -> asyncpg.Connection:
    """A connection for an operator command, to a ledger whose schema this release can use."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url.get_secret_value()))
    try:
        await check_revision(conn, settings)
    except BaseException:
        await conn.close()
        raise
    return conn


async def check_database(pool: asyncpg.Pool, settings: Settings) -> DatabaseUnreachableError | None:
    """One look before `consume` joins its group: None if the database is a ledger this release
    can write, the outage if it does not answer; raises the OperatorError of a definite refusal
    (login, database, schema revision, privileges)."""
    try:
        # Bounded: a database that accepts connections but never answers is not there either.
        async with asyncio.timeout(ATTEMPT_SECONDS), pool.acquire() as conn:
            await check_revision(conn, settings)
            await check_consumer_privileges(conn, settings)
    except TimeoutError as error:
        found = translate_database_error(error, settings)
        return found if isinstance(found, DatabaseUnreachableError) else _no_answer(settings)
    except (
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    ) as error:
        failure = translate_database_error(error, settings)
        if failure is None:
            if as_transient(error) is None:
                raise  # not an answer about the database: a bug
            # A restart's half-closed connection, a statement or lock timeout: an outage to
            # wait for, never an exit.
            return DatabaseUnreachableError(
                f"database {database_name(settings)} failed transiently ({type(error).__name__})"
            )
        if not isinstance(failure, DatabaseUnreachableError):
            raise failure from error
        return failure
    return None


def _no_answer(settings: Settings) -> DatabaseUnreachableError:
    return DatabaseUnreachableError(
        f"database {database_name(settings)} did not answer within {ATTEMPT_SECONDS:.0f}s"
    )


async def wait_until_usable(
    pool: asyncpg.Pool,
    settings: Settings,
    readiness: Readiness,
    unreachable: DatabaseUnreachableError,
    backoff: Backoff = START_BACKOFF,
) -> None:
    """After `check_database` found no answer: look again until there is one, not ready
    meanwhile, the outage logged once, at most once a minute, and when it ends. A definite
    refusal raises; a stop request cancels the wait (service.consume)."""
    outage = Outage("database")
    attempt = 0
    while True:
        attempt += 1
        readiness.database_ok = False
        outage.failing(str(unreachable))
        await asyncio.sleep(backoff.delay(attempt))
        if (found := await check_database(pool, settings)) is None:
            break
        unreachable = found
    readiness.database_ok = True
    outage.recovered()


async def read_when_usable(
    pool: asyncpg.Pool,
    settings: Settings,
    readiness: Readiness,
    read: Callable[[], Awaitable[T]],
    backoff: Backoff = START_BACKOFF,
) -> T:
    """A read at start, after `check_database` found the database usable: if it stops
    answering meanwhile (a restart), the read waits for it like any outage at start (not
    ready, wait_until_usable), never an exit. A definite refusal raises."""
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(ATTEMPT_SECONDS):  # bounded like the check
                return await read()
        except Exception as error:
            if as_transient(error) is None:
                raise
            attempt += 1
            if attempt == 1:
                log.info(
                    "the database stopped answering while starting: waiting for it",
                    extra=fields(error=type(error).__name__),
                )
            if (unreachable := await check_database(pool, settings)) is not None:
                await wait_until_usable(pool, settings, readiness, unreachable, backoff)
            else:  # it answers again, or the read itself fails: not in a tight loop
                await asyncio.sleep(backoff.delay(attempt))
