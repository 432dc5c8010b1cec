"""Expected failures: what an operator can fix, as one line and a documented exit code.

Every command ends here (`run_cli`). A driver exception (asyncpg, aiokafka, alembic) is
translated into one of the types below in ONE place, `translate`; our own checks (the schema
revision, a missing topic) raise these types directly. Anything that is not an expected
failure is a bug: its traceback is printed, then a line saying so, and the exit code is 70.
`LEDGER_LOG_LEVEL=DEBUG` prints the traceback of expected failures too.

    OperatorError                     str() is one line: the cause, then the fix
    ├── ConfigurationError         2  a setting, an argument, a topic's configuration
    ├── DatabaseCredentialsError   3  the server refused the login (28P01, 28000)
    ├── DatabaseMissingError       4  no such database (3D000)
    ├── SchemaBehindError          5  no ledger schema, or an older revision: migrate
    ├── SchemaUnknownError         6  a revision this release does not know (not a later one)
    ├── PermissionDeniedError      7  a database privilege (42501) or a Kafka ACL
    ├── TopicMissingError          8  a topic the command reads does not exist
    ├── KafkaUnreachableError      9  no broker answered at LEDGER_KAFKA_BOOTSTRAP
    ├── KafkaAuthenticationError  10  SASL refused, or the broker's certificate not trusted
    └── DatabaseUnreachableError  11  no answer from PostgreSQL (operator commands; `consume`
                                      keeps retrying instead: see schema.wait_until_usable)

Messages name hosts, users, databases and topics, never a password: they are built from the
parsed URL and from server messages, which do not carry one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import IntEnum
from typing import ClassVar

import asyncpg
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    DelegationTokenAuthorizationFailed,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
    UnsupportedSaslMechanismError,
)

from consumer.errors import LedgerError, TopicConfigError
from consumer.settings import PREFIX, Settings, SettingsError, database_address, load_settings

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    """The documented exit codes (docs/operations.md#exit-codes); a test keeps the two in step."""

    OK = 0
    CHECK_FAILED = 1  # verify: ledger and topic differ; consume --until-idle: partitions stopped
    CONFIGURATION = 2
    DATABASE_CREDENTIALS = 3
    DATABASE_MISSING = 4
    SCHEMA_BEHIND = 5
    SCHEMA_UNKNOWN = 6
    PERMISSION_DENIED = 7
    TOPIC_MISSING = 8
    KAFKA_UNREACHABLE = 9
    KAFKA_AUTHENTICATION = 10
    DATABASE_UNREACHABLE = 11
    BUG = 70  # sysexits.h EX_SOFTWARE
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class OperatorError(LedgerError):
    """A failure the operator can fix; str() is one line naming the cause and the fix."""

    exit_code: ClassVar[ExitCode]


class ConfigurationError(OperatorError):
    exit_code = ExitCode.CONFIGURATION


class DatabaseCredentialsError(OperatorError):
    exit_code = ExitCode.DATABASE_CREDENTIALS


class DatabaseMissingError(OperatorError):
    exit_code = ExitCode.DATABASE_MISSING


class SchemaBehindError(OperatorError):
    exit_code = ExitCode.SCHEMA_BEHIND


class SchemaUnknownError(OperatorError):
    exit_code = ExitCode.SCHEMA_UNKNOWN


class PermissionDeniedError(OperatorError):
    exit_code = ExitCode.PERMISSION_DENIED


class TopicMissingError(OperatorError):
    exit_code = ExitCode.TOPIC_MISSING


class KafkaUnreachableError(OperatorError):
    exit_code = ExitCode.KAFKA_UNREACHABLE


class KafkaAuthenticationError(OperatorError):
    exit_code = ExitCode.KAFKA_AUTHENTICATION


class DatabaseUnreachableError(OperatorError):
    exit_code = ExitCode.DATABASE_UNREACHABLE


# -- naming things without their secrets -----------------------------------------------------


def database_name(settings: Settings | None) -> str:
    """`user@host:port/database` of the settings' database URL: enough to find it, no
    password."""
    if settings is None:
        return "the database"
    url = database_address(settings.database_url.get_secret_value())
    return f"{url.user or ''}@{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def kafka_name(settings: Settings | None) -> str:
    if settings is None:
        return "Kafka"
    return f"Kafka at {settings.kafka_bootstrap} ({settings.kafka_security_protocol})"


# -- the one translation of driver exceptions ------------------------------------------------

_AUTHENTICATION = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)
_AUTHORIZATION = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    DelegationTokenAuthorizationFailed,
)
# The server is there but cannot take us now: starting up (57P03), full (53300), going down.
_DATABASE_BUSY = ("53", "57P")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and what it says caused it (`raise ... from`: SQLAlchemy wraps asyncpg's
    error so). Not the error it was raised while handling: a bug in an except block stays a
    bug, whatever it was handling."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _raised_by_asyncpg(error: BaseException) -> bool:
    """An OSError or timeout is the database's only if asyncpg raised it (it does not wrap
    socket errors); the Kafka client wraps its own in KafkaConnectionError."""
    return any(
        str(frame.f_globals.get("__name__", "")).startswith("asyncpg")
        for frame, _ in traceback.walk_tb(error.__traceback__)
    )


def _server_message(error: asyncpg.PostgresError) -> str:
    # The server's own first line (e.g. 'password authentication failed for user "ledger"');
    # PostgreSQL never echoes a password, and these classes never quote row data.
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def translate_database_error(
    error: BaseException, settings: Settings | None
) -> OperatorError | None:
    """The operator's view of a failure to reach or use PostgreSQL, or None if not one."""
    where = database_name(settings)
    variable = settings.database_variable if settings else f"{PREFIX}DATABASE_URL"
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return DatabaseMissingError(
            f"database {where} does not exist: create it (createdb) or fix the database name "
            f"in {variable}, then run `token-ledger migrate`"
        )
    if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):  # 28000, 28P01
        return DatabaseCredentialsError(
            f"database {where} refused the login ({_server_message(error)}): check the user "
            f"and password in {variable}"
        )
    if isinstance(error, asyncpg.InsufficientPrivilegeError):
        return PermissionDeniedError(
            f"database {where}: {_server_message(error)}: grant the role in "
            f"{variable} access to the ledger tables (or use the role that migrated them)"
        )
    sqlstate = str(getattr(error, "sqlstate", "") or "")
    if (
        isinstance(error, asyncpg.PostgresConnectionError)  # class 08
        or sqlstate.startswith(_DATABASE_BUSY)
        or (
            isinstance(error, OSError | TimeoutError | asyncpg.InterfaceError)
            and _raised_by_asyncpg(error)
        )
    ):
        detail = _server_message(error) if sqlstate else type(error).__name__
        return DatabaseUnreachableError(
            f"database {where} does not answer ({detail}): check the host and port in "
            f"{variable} and that PostgreSQL is running"
        )
    return None


def _translate_kafka_error(error: KafkaError, settings: Settings | None) -> OperatorError | None:
    where = kafka_name(settings)
    if isinstance(error, _AUTHENTICATION):
        return KafkaAuthenticationError(
            f"cannot connect to {where}: authentication failed ({type(error).__name__}): check "
            "LEDGER_KAFKA_SASL_USERNAME, LEDGER_KAFKA_SASL_PASSWORD and LEDGER_KAFKA_SASL_MECHANISM"
        )
    if isinstance(error, _AUTHORIZATION):
        return PermissionDeniedError(
            f"{where} denied an operation ({type(error).__name__}): grant the principal ACLs to "
            "read, write and create the ledger's topics and to join its consumer group"
        )
    if isinstance(error, InvalidSessionTimeoutError):
        return ConfigurationError(
            f"{where} refused LEDGER_SESSION_TIMEOUT: it must lie within the broker's"
            " group.min.session.timeout.ms and group.max.session.timeout.ms"
        )
    if isinstance(error, UnknownTopicOrPartitionError):
        return TopicMissingError(
            f"{where}: a topic does not exist ({type(error).__name__}): check LEDGER_TOPIC and "
            "LEDGER_DLQ_TOPIC"
        )
    if error.retriable:  # KafkaConnectionError, timeouts, no leader: the cluster is not there
        return KafkaUnreachableError(
            f"cannot connect to {where}: {type(error).__name__}: check LEDGER_KAFKA_BOOTSTRAP "
            "and that the brokers are running"
        )
    return None


def translate(error: BaseException, settings: Settings | None) -> OperatorError | None:
    """The one boundary: an expected failure as an OperatorError, or None (a bug)."""
    from alembic.util.exc import CommandError

    for cause in _chain(error):
        if isinstance(cause, OperatorError):
            return cause
        if isinstance(cause, SettingsError):  # e.g. a metrics host or port that cannot be bound
            return ConfigurationError(f"configuration error: {cause}")
        if isinstance(cause, TopicConfigError):
            return ConfigurationError(str(cause))
        if isinstance(cause, CommandError):  # alembic: e.g. `migrate NO-SUCH-REVISION`
            return ConfigurationError(f"migrate: {str(cause).splitlines()[0]}")
        found = (
            _translate_kafka_error(cause, settings)
            if isinstance(cause, KafkaError)
            else translate_database_error(cause, settings)
        )
        if found is not None:
            return found
    return None


async def diagnose_kafka(settings: Settings, *, seconds: float = 10.0) -> OperatorError:
    """Why no broker could be bootstrapped from: aiokafka reports every cause as
    KafkaConnectionError (and logs the real one), so ask each broker once more ourselves."""
    security = settings.kafka_security()
    where = kafka_name(settings)
    for server in settings.kafka_bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            async with asyncio.timeout(seconds):
                conn = await create_conn(host.strip("[]"), int(port), **security)
        except ssl.SSLError as error:  # before OSError: it is one
            reason = getattr(error, "reason", None) or type(error).__name__
            return KafkaAuthenticationError(
                f"cannot connect to {where}: TLS failed ({reason}): set LEDGER_KAFKA_SSL_CAFILE "
                "to the CA that signed the broker's certificate, and check "
                "LEDGER_KAFKA_SECURITY_PROTOCOL"
            )
        except KafkaError as error:
            found = _translate_kafka_error(error, settings)
            if found is not None and not isinstance(found, KafkaUnreachableError):
                return found
        except (OSError, TimeoutError):
            continue
        else:
            conn.close()  # it answers now: it did not a moment ago
    return KafkaUnreachableError(
        f"cannot connect to {where}: no broker answered: check LEDGER_KAFKA_BOOTSTRAP and that "
        "the brokers are running"
    )


def explain(error: BaseException, settings: Settings | None) -> OperatorError | None:
    """`translate`, plus asking the brokers why when aiokafka could not bootstrap."""
    found = translate(error, settings)
    if (
        settings is not None
        and isinstance(found, KafkaUnreachableError)
        and any(isinstance(cause, KafkaConnectionError) for cause in _chain(error))
    ):
        return asyncio.run(diagnose_kafka(settings))
    return found


# -- the CLI boundary ------------------------------------------------------------------------


def run_cli(app: Callable[[], object]) -> int:
    """Run the command line; every expected failure becomes one line and its exit code."""
    try:
        app()
    except SystemExit as done:  # typer/click: normal completion, typer.Exit, usage errors
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else ExitCode.CONFIGURATION)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the top boundary: everything is reported
        try:
            settings: Settings | None = load_settings()
        except SettingsError:
            settings = None  # the line is printed all the same, as text
        return report(error, settings)
    return ExitCode.OK


def report(error: BaseException, settings: Settings | None) -> int:
    """Print one line for an expected failure (the traceback too at DEBUG); a bug in full.
    Under LEDGER_LOG_FORMAT=json the line is a JSON object like every log line (the traceback
    in its `error` field), so that the most important line parses too."""
    try:
        failure = explain(error, settings)
    except Exception:  # noqa: BLE001 - diagnosing must never hide the original error
        failure = None
    debug = settings is not None and settings.log_level == "DEBUG"
    trace = "".join(traceback.format_exception(error)) if failure is None or debug else None
    if failure is None:
        _fatal(
            f"internal error ({type(error).__name__}): this is a bug, not a setting; please"
            f" report it with the traceback{'' if _json_lines(settings) else ' above'}",
            ExitCode.BUG,
            trace,
            settings,
        )
        return ExitCode.BUG
    _fatal(str(failure), failure.exit_code, trace, settings)
    return failure.exit_code


def _json_lines(settings: Settings | None) -> bool:
    if settings is not None:
        return settings.log_format == "json"
    # The settings themselves failed: the variable, as the settings would read it.
    return os.environ.get(f"{PREFIX}LOG_FORMAT", "").strip().lower() == "json"


def fatal_line(message: str, code: int, settings: Settings | None = None) -> None:
    """The one line a command ends on (`token-ledger: <message>`, or a JSON object under
    LEDGER_LOG_FORMAT=json), for failures decided outside `report`."""
    _fatal(message, code, None, settings)


def _fatal(message: str, code: int, trace: str | None, settings: Settings | None) -> None:
    if _json_lines(settings):
        line = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "critical" if code == ExitCode.BUG else "error",
            "logger": "token_ledger",
            "msg": message,
            "exit_code": int(code),
        }
        if trace is not None:
            line["error"] = trace
        print(json.dumps(line), file=sys.stderr)
        return
    if trace is not None:
        print(trace, end="", file=sys.stderr)
    print(f"token-ledger: {message}", file=sys.stderr)
