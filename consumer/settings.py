"""Configuration: one frozen object read once from `LEDGER_*` variables (and `.env`).

A bad value fails at start with `SettingsError`, whose message is one line naming the variable.
The Kafka SASL password and the database URL's password are `SecretStr`-guarded: they never
appear in a repr, a log line or an error.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.events import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_FUTURE_SKEW

PREFIX = "LEDGER_"
# A database URL as SQLAlchemy reads one (driver://user:password@host:port/database?query,
# every part after the driver optional), without importing SQLAlchemy: that costs each command
# ~0.15 s of CPU at start. tests/unit/consumer/test_settings.py holds the two readings equal.
_DATABASE_URL = re.compile(
    r"(?P<driver>[\w+]+)://"
    r"(?:(?P<user>[^:/]*)(?::[^@]*)?@)?"
    r"(?:(?:\[(?P<ipv6>[^/?]+)\]|(?P<host>[^/:?]+))?(?::(?P<port>[^/?]*))?)?"
    r"(?:/(?P<database>[^?]*))?"
)


@dataclass(frozen=True)
class DatabaseAddress:
    """Where a database URL points, without its password."""

    driver: str
    user: str | None
    host: str | None
    port: int | None
    database: str | None


def database_address(url: str) -> DatabaseAddress:
    """The parts of a database URL; ValueError naming what is wrong (never quoting it)."""
    match = _DATABASE_URL.match(url)
    if match is None:
        raise ValueError("not a database URL (postgresql+asyncpg://user:pass@host/db)")
    port = match["port"]
    try:
        # int() as SQLAlchemy reads it: "5432\n" from a secret file is 5432, "" an error.
        number = None if port is None else int(port)
    except ValueError:
        raise ValueError("the database URL's port is not a number") from None
    user, database = match["user"], match["database"]
    return DatabaseAddress(
        driver=match["driver"],
        user=None if user is None else unquote(user),
        host=match["host"] or match["ipv6"],
        port=number,
        database=None if database is None else unquote(database),
    )


class SettingsError(ValueError):
    """A configuration value is unusable; str() is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=".env",
        env_ignore_empty=True,  # `LEDGER_X=` (as compose files often have) means "not set"
        extra="ignore",
        frozen=True,
    )

    kafka_bootstrap: str = "localhost:9092"
    database_url: SecretStr = SecretStr("postgresql+asyncpg://ledger:ledger@127.0.0.1:5432/ledger")
    topic: str = Field("chat.turn-events", min_length=1, max_length=249)
    dlq_topic: str = Field("chat.turn-events.dlq", min_length=1, max_length=249)
    group_id: str = Field("token-ledger", min_length=1)
    # A batch is what is fetched at once (never waited for), up to this many records and
    # this many bytes of values (at least one record): larger batches cost fewer round trips
    # and statements per event (`make bench`), the byte cap bounds their memory.
    max_batch: int = Field(2_000, ge=1, le=100_000)
    max_batch_bytes: int = Field(16 * 1024 * 1024, ge=1, le=1024 * 1024 * 1024)
    max_event_bytes: int = Field(DEFAULT_MAX_EVENT_BYTES, ge=1024, le=64 * 1024 * 1024)
    # Every interface by default: Prometheus scrapes from another host or container.
    metrics_host: str = "0.0.0.0"  # noqa: S104
    metrics_port: int = Field(9464, ge=0, le=65535)
    stall_seconds: float = Field(120.0, gt=0)
    # How long the group waits for a member that stopped heartbeating (a kill -9, a frozen
    # host) before its partitions move: within the broker's group.min/max.session.timeout.ms
    # (6 s .. 30 min by default). Heartbeats must come well inside it (Kafka advises a third).
    session_timeout: float = Field(10.0, ge=1, le=3600)
    heartbeat_interval: float = Field(3.0, ge=0.01, le=3600)
    # Whether `consume` and `relay` create missing topics (true suits devstack and compose;
    # production topics are usually provisioned, and a mistyped name should stop us, exit 8).
    create_topics: bool = True
    # Seconds an event's occurred_at may lie ahead of its record's timestamp.
    max_future_skew: float = Field(
        DEFAULT_MAX_FUTURE_SKEW.total_seconds(), gt=0, le=10 * 365 * 86400
    )
    # A stored offset outside its partition's log: stop that partition, or resume at its start.
    offset_reset: Literal["fail", "earliest"] = "fail"
    # The billing stream (docs/contract.md#billing-stream): where revisions go, whether
    # `consume` relays them itself (false: run `token-ledger relay` instead), how long
    # published ones are kept.
    billing_topic: str = Field("billing.token-usage", min_length=1, max_length=249)
    relay: bool = True
    # Budget alerts (docs/contract.md#budgets-and-spend-alerts), published by the same relay.
    budget_topic: str = Field("billing.budget-alerts", min_length=1, max_length=249)
    relay_batch: int = Field(500, ge=1, le=10_000)  # revisions per publish-and-mark transaction
    # `token-ledger relay`'s /metrics, /healthz and /readyz: not LEDGER_METRICS_PORT, so that a
    # relay beside a consumer (a sidecar, one host) does not take the consumer's port.
    relay_metrics_port: int = Field(9465, ge=0, le=65535)
    outbox_retention: timedelta = Field(timedelta(days=7), gt=timedelta(0))
    # `token-ledger serve` (docs/operations.md#the-usage-api): its read-only role (unset: the
    # ledger's URL, with a warning), and how long one request's query may run.
    api_database_url: SecretStr | None = None
    api_statement_timeout: float = Field(5.0, gt=0, le=600)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None

    # Which variable `database_url` came from, for messages that tell an operator what to fix:
    # `serve` names LEDGER_API_DATABASE_URL (consumer/api/serve.py: named_for_the_api).
    _database_variable: str = PrivateAttr(default=f"{PREFIX}DATABASE_URL")

    @model_validator(mode="after")
    def _heartbeat_inside_session(self) -> Settings:
        if round(self.heartbeat_interval * 1000) >= round(self.session_timeout * 1000):
            raise ValueError(
                f"{PREFIX}HEARTBEAT_INTERVAL: {self.heartbeat_interval:g}s must be less than"
                f" {PREFIX}SESSION_TIMEOUT ({self.session_timeout:g}s)"
            )
        return self

    @field_validator("database_url", "api_database_url")
    @classmethod
    def _postgres_asyncpg_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        driver = database_address(value.get_secret_value()).driver
        if driver != "postgresql+asyncpg":
            raise ValueError(f"driver must be postgresql+asyncpg, not {driver}")
        return value

    @field_validator("metrics_host")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                "expected an IP address to listen on, such as 0.0.0.0, 127.0.0.1 or ::"
            ) from None
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("expected host:port[,host:port...]")
        return value

    @property
    def database_variable(self) -> str:
        """The variable that named `database_url`."""
        return self._database_variable

    def naming_database(self, url: SecretStr, variable: str) -> Settings:
        """These settings with another database, named by another variable."""
        named = self.model_copy(update={"database_url": url})
        named._database_variable = variable
        return named

    @property
    def future_skew(self) -> timedelta:
        return timedelta(seconds=self.max_future_skew)

    def kafka_security(self) -> dict[str, Any]:
        """aiokafka keyword arguments for the configured security protocol."""
        options: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL"):
            if not (self.kafka_sasl_mechanism and self.kafka_sasl_username):
                raise SettingsError(
                    f"{PREFIX}KAFKA_SASL_MECHANISM and {PREFIX}KAFKA_SASL_USERNAME are required "
                    f"with {PREFIX}KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
                )
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
            )
        if self.kafka_security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile)
        return options


def load_settings(**overrides: Any) -> Settings:
    """Read the environment once; turn the first invalid value into a one-line SettingsError."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule over several variables: its message names them
            raise SettingsError(message) from None
        raise SettingsError(f"{PREFIX}{str(error['loc'][0]).upper()}: {message}") from None
    if settings.kafka_security_protocol.startswith("SASL"):
        settings.kafka_security()  # fail at start, not at the first connection
    return settings
