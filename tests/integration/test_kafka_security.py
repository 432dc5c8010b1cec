"""The consumer's Kafka security settings against a real broker with a SASL_PLAINTEXT
listener (SCRAM-SHA-256 users) and an SSL listener (a throw-away CA made with openssl)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

# Re-exported without __all__, which mypy's strict mode does not count as exported.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from consumer.failures import ExitCode
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from devstack.kafka import KafkaBroker
from devstack.processes import free_port
from tests.integration.harness import (
    REPO,
    ConsumerProcess,
    Stack,
    expected_summary,
    ledger_summary,
    said,
)

USER, PASSWORD = "ledger-consumer", "correct-horse-battery"
LIMITED, LIMITED_PASSWORD = "ledger-limited", "staple-limited-4242"  # denied by an ACL


def _certificates(directory: Path) -> tuple[Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1: (CA file, broker keystore)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=token-ledger test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.p8")
    keystore = directory / "keystore.pem"
    keystore.write_text(
        (directory / "server.p8").read_text() + (directory / "server.crt").read_text()
    )
    return directory / "ca.pem", keystore


@pytest.fixture(scope="module")
def certificates() -> Iterator[tuple[Path, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="token-ledger-tls-"))
    yield _certificates(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def secure_broker(certificates: tuple[Path, Path]) -> Iterator[KafkaBroker]:
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-kafka-secure-"))
    broker = KafkaBroker(
        workdir,
        port=free_port(),
        controller_port=free_port(),
        sasl_port=free_port(),
        scram_users={USER: PASSWORD, LIMITED: LIMITED_PASSWORD},
        authorizer=True,
        ssl_port=free_port(),
        ssl_keystore=certificates[1],
    )
    broker.start()
    yield broker
    broker.stop(grace_seconds=5.0)
    shutil.rmtree(workdir, ignore_errors=True)


def _sasl_env(stack: Stack, broker: KafkaBroker, password: str, **extra: str) -> dict[str, str]:
    return stack.env(
        LEDGER_KAFKA_BOOTSTRAP=broker.sasl_bootstrap,
        LEDGER_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        LEDGER_KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
        LEDGER_KAFKA_SASL_USERNAME=USER,
        LEDGER_KAFKA_SASL_PASSWORD=password,
        **extra,
    )


async def test_consumer_authenticates_with_scram(
    secure_broker: KafkaBroker, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(secure_broker.bootstrap, ledger_url)  # publishing uses the plain listener
    records, expect = plan_traffic(
        TrafficConfig(
            threads=20,
            turns_per_thread=3,
            seed=41,
            poison_rate=0,
            start=datetime(2026, 11, 26, tzinfo=UTC),
        )
    )
    await stack.publish(records)
    consumer = ConsumerProcess(
        _sasl_env(stack, secure_broker, PASSWORD), tmp_path / "c.log", "--until-idle"
    ).start()
    try:
        assert consumer.wait() == 0, consumer.logs()
    finally:
        consumer.stop_quietly()
    assert await ledger_summary(stack) == expected_summary(expect)
    assert PASSWORD not in consumer.logs()


def test_wrong_credentials_fail_with_one_clear_line(
    secure_broker: KafkaBroker, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(secure_broker.bootstrap, ledger_url)
    wrong = "not-the-password-4711"
    env = _sasl_env(stack, secure_broker, wrong, LEDGER_LOG_FORMAT="text")
    consumer = ConsumerProcess(env, tmp_path / "c.log").start()
    try:
        assert consumer.wait(timeout=90) == ExitCode.KAFKA_AUTHENTICATION
    finally:
        consumer.stop_quietly()
    # An operator command the same way: its own line, not the consumer's.
    listed = subprocess.run(
        [sys.executable, "-m", "consumer", "dlq", "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == ExitCode.KAFKA_AUTHENTICATION, listed.stderr
    for output in (consumer.logs(), listed.stderr):
        lines = [said(line) for line in output.strip().splitlines()]
        assert len(lines) <= 2, output  # aiokafka's own line, then ours
        assert lines[-1].startswith(
            f"token-ledger: cannot connect to Kafka at {secure_broker.sasl_bootstrap} "
            "(SASL_PLAINTEXT): authentication failed"
        ), output
        assert "LEDGER_KAFKA_SASL_PASSWORD" in lines[-1]
        assert "Traceback" not in output
        assert wrong not in output


async def test_consumer_connects_over_tls_with_the_configured_ca(
    secure_broker: KafkaBroker, certificates: tuple[Path, Path], ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(secure_broker.bootstrap, ledger_url)
    records, expect = plan_traffic(
        TrafficConfig(
            threads=10,
            turns_per_thread=3,
            seed=42,
            poison_rate=0,
            start=datetime(2026, 11, 26, tzinfo=UTC),
        )
    )
    await stack.publish(records)
    env = stack.env(
        LEDGER_KAFKA_BOOTSTRAP=secure_broker.ssl_bootstrap,
        LEDGER_KAFKA_SECURITY_PROTOCOL="SSL",
        LEDGER_KAFKA_SSL_CAFILE=str(certificates[0]),
    )
    consumer = ConsumerProcess(env, tmp_path / "c.log", "--until-idle").start()
    try:
        assert consumer.wait() == 0, consumer.logs()
    finally:
        consumer.stop_quietly()
    assert await ledger_summary(stack) == expected_summary(expect)

    # Without our CA the broker's certificate is not trusted: one line naming the fix.
    untrusted = ConsumerProcess(
        {**env, "LEDGER_KAFKA_SSL_CAFILE": "", "LEDGER_LOG_FORMAT": "text"}, tmp_path / "u.log"
    ).start()
    try:
        assert untrusted.wait(timeout=90) == ExitCode.KAFKA_AUTHENTICATION, untrusted.logs()
    finally:
        untrusted.stop_quietly()
    last = untrusted.logs().strip().splitlines()[-1]
    assert last.startswith("token-ledger: cannot connect to Kafka"), untrusted.logs()
    assert "TLS failed" in last and "LEDGER_KAFKA_SSL_CAFILE" in last


def test_a_denied_acl_is_permission_denied(
    secure_broker: KafkaBroker, ledger_url: str, tmp_path: Path
) -> None:
    """A principal the broker authenticates but does not authorise: one line, exit 7."""
    stack = Stack.fresh(secure_broker.bootstrap, ledger_url)
    admin = AdminClient({"bootstrap.servers": secure_broker.bootstrap})  # ANONYMOUS: super user
    denials = [
        AclBinding(
            kind,
            prefix,
            ResourcePatternType.PREFIXED,
            f"User:{LIMITED}",
            "*",
            AclOperation.ALL,
            AclPermissionType.DENY,
        )
        for kind, prefix in ((ResourceType.TOPIC, stack.topic), (ResourceType.GROUP, "group-"))
    ]
    for future in admin.create_acls(denials).values():
        future.result(timeout=30)
    env = stack.env(
        LEDGER_KAFKA_BOOTSTRAP=secure_broker.sasl_bootstrap,
        LEDGER_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        LEDGER_KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
        LEDGER_KAFKA_SASL_USERNAME=LIMITED,
        LEDGER_KAFKA_SASL_PASSWORD=LIMITED_PASSWORD,
        LEDGER_LOG_FORMAT="text",
    )
    consumer = ConsumerProcess(env, tmp_path / "c.log").start()
    try:
        assert consumer.wait(timeout=90) == ExitCode.PERMISSION_DENIED, consumer.logs()
    finally:
        consumer.stop_quietly()
    listed = subprocess.run(
        [sys.executable, "-m", "consumer", "dlq", "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == ExitCode.PERMISSION_DENIED, listed.stderr
    for output in (consumer.logs(), listed.stderr):
        lines = output.strip().splitlines()
        assert len(lines) <= 2, output
        assert "TopicAuthorizationFailedError" in lines[-1] and "grant" in lines[-1], output
        assert "Traceback" not in output and LIMITED_PASSWORD not in output
