"""The consumer's Kafka security settings against a real broker with a SASL_PLAINTEXT
listener and SCRAM-SHA-256 users."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devstack.kafka import KafkaBroker
from devstack.processes import free_port
from producer.simulator import TrafficConfig, plan_traffic
from tests.integration.harness import ConsumerProcess, Stack, expected_summary, ledger_summary

USER, PASSWORD = "ledger-consumer", "correct-horse-battery"


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[KafkaBroker]:
    workdir = Path(tempfile.mkdtemp(prefix="token-ledger-kafka-sasl-"))
    broker = KafkaBroker(
        workdir,
        port=free_port(),
        controller_port=free_port(),
        sasl_port=free_port(),
        scram_users={USER: PASSWORD},
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
    sasl_broker: KafkaBroker, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(sasl_broker.bootstrap, ledger_url)  # publishing uses the plain listener
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
        _sasl_env(stack, sasl_broker, PASSWORD), tmp_path / "c.log", "--until-idle"
    ).start()
    try:
        assert consumer.wait() == 0, consumer.logs()
    finally:
        consumer.stop_quietly()
    assert await ledger_summary(stack) == expected_summary(expect)
    assert PASSWORD not in consumer.logs()


def test_wrong_credentials_fail_with_one_clear_line(
    sasl_broker: KafkaBroker, ledger_url: str, tmp_path: Path
) -> None:
    stack = Stack.fresh(sasl_broker.bootstrap, ledger_url)
    wrong = "not-the-password-4711"
    consumer = ConsumerProcess(
        _sasl_env(stack, sasl_broker, wrong, LEDGER_LOG_FORMAT="text"), tmp_path / "c.log"
    ).start()
    try:
        assert consumer.wait(timeout=90) == 1
    finally:
        consumer.stop_quietly()
    output = consumer.logs()
    assert f"cannot connect to Kafka at {sasl_broker.sasl_bootstrap} (SASL_PLAINTEXT)" in output
    assert "Traceback" not in output
    assert wrong not in output
