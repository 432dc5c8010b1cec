"""The one boundary (consumer/failures.py): which failure is which exit code, what is printed,
and that docs/operations.md's table is the code's table. Against real services: tests/integration/
test_failures.py."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from sqlalchemy.exc import DBAPIError

from consumer.api.serve import named_for_the_api
from consumer.errors import TopicConfigError
from consumer.failures import (
    DatabaseCredentialsError,
    DatabaseMissingError,
    ExitCode,
    KafkaAuthenticationError,
    KafkaUnreachableError,
    OperatorError,
    PermissionDeniedError,
    SchemaBehindError,
    TopicMissingError,
    database_name,
    report,
    translate,
)
from consumer.settings import Settings, load_settings

OPERATIONS = Path(__file__).resolve().parents[3] / "docs" / "operations.md"
SECRET = "s3cret-never-printed"


@pytest.fixture
def settings() -> Settings:
    return load_settings(
        database_url=f"postgresql+asyncpg://billing:{SECRET}@db.internal:6543/ledger",
        kafka_bootstrap="k1:9092,k2:9092",
    )


def test_the_operations_guide_documents_every_exit_code() -> None:
    rows = re.findall(r"^\| `(\d+)` \|", OPERATIONS.read_text(), flags=re.MULTILINE)
    assert [int(code) for code in rows] == [int(code) for code in ExitCode]


def test_every_operator_error_has_a_code_of_the_table() -> None:
    def leaves(cls: type[OperatorError]) -> list[type[OperatorError]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *leaves(sub))]

    codes = {cls.exit_code for cls in leaves(OperatorError)}
    assert codes == set(ExitCode) - {
        ExitCode.OK,
        ExitCode.CHECK_FAILED,
        ExitCode.BUG,
        ExitCode.INTERRUPTED,
    }


def test_the_database_is_named_without_its_password(settings: Settings) -> None:
    assert database_name(settings) == "billing@db.internal:6543/ledger"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.InvalidPasswordError('password authentication failed for user "billing"'),
         DatabaseCredentialsError),
        (asyncpg.InvalidAuthorizationSpecificationError('role "billing" does not exist'),
         DatabaseCredentialsError),
        (asyncpg.InvalidCatalogNameError('database "ledger" does not exist'),
         DatabaseMissingError),
        (asyncpg.InsufficientPrivilegeError("permission denied for table token_usage"),
         PermissionDeniedError),
        (SaslAuthenticationFailed("Authentication failed"), KafkaAuthenticationError),
        (TopicAuthorizationFailedError(), PermissionDeniedError),
        (GroupAuthorizationFailedError(), PermissionDeniedError),
        (UnknownTopicOrPartitionError(), TopicMissingError),
        (KafkaConnectionError("Unable to bootstrap"), KafkaUnreachableError),
        (TopicConfigError("dead-letter topic too small"), OperatorError),
    ],
)  # fmt: skip
def test_driver_errors_are_translated(
    settings: Settings, error: Exception, expected: type[OperatorError]
) -> None:
    found = translate(error, settings)
    assert isinstance(found, expected)
    assert "\n" not in str(found) and SECRET not in str(found)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InvalidPasswordError('password authentication failed for user "api"'),
        asyncpg.InvalidCatalogNameError('database "ledger" does not exist'),
        asyncpg.InsufficientPrivilegeError("permission denied for table token_usage"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
    ],
)
def test_serve_names_the_variable_of_its_own_database(error: Exception) -> None:
    """`serve` connects with LEDGER_API_DATABASE_URL: its hints name that variable and that
    database, never the consumer's."""
    settings = load_settings(
        database_url="postgresql+asyncpg://ledger:x@db.internal:5432/ledger",
        api_database_url=f"postgresql+asyncpg://reader:{SECRET}@replica:6543/ledger",
    )
    consumer_hint, serve_hint = (
        str(translate(error, s)) for s in (settings, named_for_the_api(settings))
    )
    assert "LEDGER_DATABASE_URL" in consumer_hint and "ledger@db.internal" in consumer_hint
    assert "LEDGER_API_DATABASE_URL" in serve_hint and "reader@replica:6543" in serve_hint
    assert " LEDGER_DATABASE_URL" not in serve_hint and SECRET not in serve_hint


def test_a_wrapped_driver_error_is_found_under_its_wrapper(settings: Settings) -> None:
    """alembic runs on SQLAlchemy, which wraps asyncpg's error (as `migrate` shows it)."""

    def alter() -> None:
        try:
            raise asyncpg.InsufficientPrivilegeError("must be owner of table chat_threads")
        except asyncpg.PostgresError as cause:
            raise DBAPIError("ALTER TABLE chat_threads ...", {}, cause) from cause

    with pytest.raises(DBAPIError) as wrapped:
        alter()
    assert isinstance(translate(wrapped.value, settings), PermissionDeniedError)


def test_a_bug_while_handling_a_driver_error_stays_a_bug(settings: Settings) -> None:
    def handle() -> None:
        try:
            raise asyncpg.InvalidPasswordError("password authentication failed")
        except asyncpg.PostgresError:
            raise KeyError("positions") from None

    with pytest.raises(KeyError) as raised:
        handle()
    assert translate(raised.value, settings) is None


def test_bugs_are_not_translated(settings: Settings) -> None:
    assert translate(KeyError("positions"), settings) is None
    assert translate(asyncpg.UndefinedColumnError("column x does not exist"), settings) is None
    # An OSError is the database's only when asyncpg raised it.
    assert translate(ConnectionRefusedError(111, "refused"), settings) is None


def test_an_expected_failure_is_one_line(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code = report(SchemaBehindError("database x has no ledger schema: run it"), settings)
    assert code == ExitCode.SCHEMA_BEHIND
    assert capsys.readouterr().err == "token-ledger: database x has no ledger schema: run it\n"


def test_debug_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    debug = load_settings(log_level="DEBUG")
    with pytest.raises(SchemaBehindError) as raised:
        raise SchemaBehindError("database x has no ledger schema: run it")
    assert report(raised.value, debug) == ExitCode.SCHEMA_BEHIND
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("run it\n")


def test_a_bug_shows_its_traceback_and_says_so(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    positions: dict[str, int] = {}
    with pytest.raises(KeyError) as raised:
        positions["positions"]  # the bug
    assert report(raised.value, settings) == ExitCode.BUG
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "KeyError: 'positions'" in err
    assert err.splitlines()[-1].startswith("token-ledger: internal error (KeyError): this is a bug")
