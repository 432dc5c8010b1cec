"""Settings: defaults of the spec, LEDGER_* overrides, one clear line per bad value."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from consumer.settings import SettingsError, database_address, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    for name in list(os.environ):
        if name.startswith("LEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_follow_the_spec() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap == "localhost:9092"
    assert settings.topic == "chat.turn-events"
    assert settings.dlq_topic == "chat.turn-events.dlq"
    assert settings.group_id == "token-ledger"
    assert settings.max_event_bytes == 1024 * 1024
    assert settings.metrics_port == 9464
    assert settings.metrics_host == "0.0.0.0"


@pytest.mark.parametrize("host", ["127.0.0.1", "::", "::1", "10.1.2.3"])
def test_metrics_host_takes_an_ip_address(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("LEDGER_METRICS_HOST", host)
    assert load_settings().metrics_host == host


def test_environment_and_dotenv_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    with open(".env", "w") as env:
        env.write("LEDGER_GROUP_ID=from-dotenv\nLEDGER_MAX_BATCH=7\n")
    monkeypatch.setenv("LEDGER_MAX_BATCH", "9")
    settings = load_settings()
    assert settings.group_id == "from-dotenv"
    assert settings.max_batch == 9


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LEDGER_MAX_BATCH", "lots"),
        ("LEDGER_MAX_BATCH", "0"),
        ("LEDGER_METRICS_PORT", "70000"),
        ("LEDGER_METRICS_HOST", "localhost"),
        ("LEDGER_METRICS_HOST", "0.0.0.0:9464"),
        ("LEDGER_METRICS_HOST", "256.1.1.1"),
        ("LEDGER_KAFKA_BOOTSTRAP", "no-port-here"),
        ("LEDGER_DATABASE_URL", "mysql://u:p@h/db"),
        ("LEDGER_LOG_FORMAT", "xml"),
        ("LEDGER_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("LEDGER_KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("LEDGER_STALL_SECONDS", "-1"),
        ("LEDGER_SESSION_TIMEOUT", "0.5"),
        ("LEDGER_HEARTBEAT_INTERVAL", "0"),
        ("LEDGER_CREATE_TOPICS", "perhaps"),
    ],
)
def test_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value).startswith(f"{variable}:")
    assert "\n" not in str(error.value)


def test_the_heartbeat_must_come_inside_the_session_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEDGER_SESSION_TIMEOUT", "6")
    monkeypatch.setenv("LEDGER_HEARTBEAT_INTERVAL", "6")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value) == (
        "LEDGER_HEARTBEAT_INTERVAL: 6s must be less than LEDGER_SESSION_TIMEOUT (6s)"
    )


async def test_the_group_session_timings_reach_the_source_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from consumer.kafka.assembly import source_consumer

    monkeypatch.setenv("LEDGER_SESSION_TIMEOUT", "6.5")
    monkeypatch.setenv("LEDGER_HEARTBEAT_INTERVAL", "2")
    consumer = source_consumer(load_settings(), fetch_bytes=1024)
    # aiokafka keeps them for its group coordinator (not a public attribute).
    assert (consumer._session_timeout_ms, consumer._heartbeat_interval_ms) == (6500, 2000)


def test_sasl_needs_mechanism_and_username(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGER_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(SettingsError, match="LEDGER_KAFKA_SASL_MECHANISM"):
        load_settings()
    monkeypatch.setenv("LEDGER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LEDGER_KAFKA_SASL_USERNAME", "ledger")
    monkeypatch.setenv("LEDGER_KAFKA_SASL_PASSWORD", "hunter2")
    options = load_settings().kafka_security()
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == "hunter2"


def test_secrets_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGER_DATABASE_URL", "postgresql+asyncpg://u:topsecret@h/db")
    monkeypatch.setenv("LEDGER_KAFKA_SASL_PASSWORD", "hunter2")
    text = repr(load_settings())
    assert "topsecret" not in text and "hunter2" not in text


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path: os.PathLike[str]) -> None:
    env = {
        **os.environ,
        "LEDGER_MAX_BATCH": "lots",
        "LEDGER_DATABASE_URL": "postgresql+asyncpg://u:topsecret@h/db",
    }
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "simulate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LEDGER_MAX_BATCH" in lines[0]
    assert "topsecret" not in result.stderr


def test_consume_exits_2_with_one_line_on_a_bad_metrics_host() -> None:
    env = {**os.environ, "LEDGER_METRICS_HOST": "everywhere"}
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "consume"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "token-ledger: configuration error: LEDGER_METRICS_HOST: expected an IP address"
    )


def test_an_empty_variable_means_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGER_GROUP_ID", "")
    monkeypatch.setenv("LEDGER_KAFKA_SSL_CAFILE", "")
    settings = load_settings()
    assert settings.group_id == "token-ledger"
    assert settings.kafka_ssl_cafile is None


@pytest.mark.parametrize(
    ("command", "env", "code", "named"),
    [
        (["simulate"], {"LEDGER_MAX_BATCH": "lots"}, 2, "LEDGER_MAX_BATCH"),
        # A database nobody listens on: the fatal line after the command's own log lines.
        (["usage"], {"LEDGER_DATABASE_URL": "postgresql+asyncpg://u:p@127.0.0.1:9/db"}, 11, ":9/"),
        # serve names the API's database, whatever LEDGER_DATABASE_URL says (a chart gives it
        # none).
        (
            ["serve", "--port", "0"],
            {"LEDGER_API_DATABASE_URL": "postgresql+asyncpg://api:p@127.0.0.1:9/apidb"},
            11,
            "api@127.0.0.1:9/apidb",
        ),
    ],
)
def test_every_stderr_line_is_json_under_the_json_log_format(
    command: list[str], env: dict[str, str], code: int, named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *command],
        env={**os.environ, "LEDGER_LOG_FORMAT": "json", **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == code, result.stderr
    lines = [json.loads(line) for line in result.stderr.strip().splitlines()]
    fatal = lines[-1]
    assert fatal["level"] == "error" and fatal["exit_code"] == code
    assert named in fatal["msg"]


def test_usage_refuses_a_since_that_is_not_before_until() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "consumer",
            "usage",
            "--since",
            "2026-02-01",
            "--until",
            "2026-01-01",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "token-ledger: usage: --since 2026-02-01T00:00:00+00:00 is not before"
        " --until 2026-01-01T00:00:00+00:00"
    ]


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["usage"], ["[user|space|model|day|month]", "default: --by space --by model"]),
        (
            ["simulate"],
            [
                "as exact copies",
                "legacy message.appended",
                "finalized twice",
                "published shuffled",
                "poison records per turn",
            ],
        ),
    ],
)
def test_help_shows_the_choices_and_what_each_option_does(
    command: list[str], shown: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *command, "--help"],
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "<list[str]>" not in result.stdout
    for text in shown:
        assert text in result.stdout


@given(
    st.from_regex(
        r"[a-z+]{1,12}://([a-z%@:/\[\]0-9.]{0,12}@)?(\[[0-9a-f:]{1,10}\]|[a-z0-9.%-]{0,12})"
        # Ports as int() reads them or not: signs, spaces, underscores, a secret file's
        # newline, other scripts' digits.
        r"(:[0-9a-z +_\n\-\u0663\uff15]{0,6})?(/[a-z0-9%@:./_-]{0,12})?(\?[a-z=&]{0,8})?",
        fullmatch=True,
    )
)
def test_a_database_url_reads_as_sqlalchemy_reads_it(url: str) -> None:
    # The consumer reads URLs without importing SQLAlchemy (each command's start-up); alembic
    # still reads them with SQLAlchemy, so the two must agree on every part.
    try:
        expected = make_url(url)
    except (ArgumentError, ValueError):
        with pytest.raises(ValueError, match=r"not a database URL|port is not a number"):
            database_address(url)
        return
    found = database_address(url)
    assert (found.driver, found.user, found.host, found.port, found.database) == (
        expected.drivername,
        expected.username,
        expected.host,
        expected.port,
        expected.database,
    )


def test_a_port_read_from_a_secret_file_keeps_working() -> None:
    # A URL that ends at its port, from a file that ends in a newline.
    assert database_address("postgresql+asyncpg://ledger:secret@db:5432\n").port == 5432


@pytest.mark.parametrize("url", ["localhost/db", "postgresql+asyncpg//h/db", ""])
def test_a_database_url_without_a_driver_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="not a database URL"):
        database_address(url)
