"""docker-compose.yml against the Compose Specification, loaded by compose-go (the loader Docker
Compose uses, built by `make deploy-tools`), and shaped to scale: `docker compose up --scale
consumer=3` (docs/operations.md#scaling-with-compose)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from devstack.deploy_tools import COMPOSE_CHECK

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker-compose.yml"


def compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    assert COMPOSE_CHECK.exists(), f"{COMPOSE_CHECK} is missing: `make deploy-tools` builds it"
    return subprocess.run(
        [COMPOSE_CHECK, path.name],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_compose_file_is_valid_under_the_compose_specification() -> None:
    result = compose_check(COMPOSE)
    assert result.returncode == 0, result.stderr
    assert (
        "services: api-role, consumer, grafana, kafka, migrate, postgres, prometheus, serve,"
        " simulate" in result.stdout
    )


def test_the_check_refuses_what_the_specification_does_not_allow(tmp_path: Path) -> None:
    """The check bites: a misspelled key, a dependency on no service, an undeclared volume."""
    text = COMPOSE.read_text()
    for broken, named in (
        (text.replace("stop_grace_period:", "stop_grace_periods:"), "stop_grace_periods"),
        (
            text.replace("      migrate:\n        condition", "      migrat:\n        condition"),
            "migrat",
        ),
        (text.replace("  ledger-db:  #", "  ledger-dbs:  #"), "ledger-db"),
    ):
        assert broken != text
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(broken)
        result = compose_check(copy)
        assert result.returncode == 1, (named, result.stdout)
        assert named in result.stderr, result.stderr


def test_the_consumer_scales_and_prometheus_finds_every_replica() -> None:
    consumer = compose()["services"]["consumer"]
    assert "container_name" not in consumer  # a fixed name allows one container
    for port in consumer.get("ports", []):
        assert ":" not in str(port), port  # a fixed host port allows one container
    scrape = yaml.safe_load((REPO / "dashboards/prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert "static_configs" not in job
    assert job["dns_sd_configs"][0]["names"] == ["consumer"]  # the compose service's name


def test_the_ledger_database_and_the_broker_keep_their_data_in_named_volumes() -> None:
    loaded = compose()
    volumes = {name: service.get("volumes", []) for name, service in loaded["services"].items()}
    assert "ledger-db:/var/lib/postgresql/data" in volumes["postgres"]
    assert "kafka-data:/var/lib/kafka/data" in volumes["kafka"]
    kafka = loaded["services"]["kafka"]["environment"]
    assert kafka["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert {"ledger-db", "kafka-data"} <= set(loaded["volumes"])


def test_the_usage_api_reads_with_its_own_role_after_the_migrations() -> None:
    """serve connects as a member of token_ledger_api (docs/operations.md#the-usage-api), made
    once the migrations created that group role."""
    services = compose()["services"]
    serve = services["serve"]
    assert serve["command"][0] == "serve"
    api_url = serve["environment"]["LEDGER_API_DATABASE_URL"]
    assert "//ledger_api:" in api_url
    assert serve["environment"]["LEDGER_DATABASE_URL"] != api_url
    role = services["api-role"]
    assert "IN ROLE token_ledger_api" in role["command"][-1]
    assert role["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert serve["depends_on"]["api-role"]["condition"] == "service_completed_successfully"
