"""The observability files hold together: compose mounts exist, settings agree, every service
is health-checked or one-shot, the dashboard is provisioned by a stable uid, and every metric
the dashboard and alerts use is one the consumer exposes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from consumer.http.metrics import LedgerMetrics
from consumer.settings import Settings
from tests.observability import (
    PROMETHEUS,
    REPO,
    dashboard,
    exposed_sample_names,
    referenced_metrics,
)


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def test_every_mounted_file_exists_in_the_repo() -> None:
    compose = _compose()
    mounts = [
        volume.split(":")[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
    ]
    files = [source for source in mounts if source not in compose["volumes"]]  # named: Docker's
    assert files
    for source in files:
        assert (REPO / source).exists(), source


def test_every_service_is_health_checked_or_one_shot() -> None:
    services = _compose()["services"]
    awaited_once = {
        name
        for service in services.values()
        for name, dependency in (service.get("depends_on") or {}).items()
        if dependency.get("condition") == "service_completed_successfully"
    }
    for name, service in services.items():
        one_shot = service.get("restart") == "no" and (
            name in awaited_once or "profiles" in service
        )
        assert "healthcheck" in service or one_shot, name


def test_ledger_variables_are_settings_and_ports_agree() -> None:
    compose = _compose()
    fields = {f"LEDGER_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for variable in service.get("environment") or {}:
            if variable.startswith("LEDGER_"):
                assert variable in fields, f"{name}: {variable}"
    consumer = compose["services"]["consumer"]
    port = consumer["environment"]["LEDGER_METRICS_PORT"]
    assert consumer["ports"] == [port]  # no fixed host port: `--scale consumer=N` works
    assert port in str(consumer["healthcheck"]["test"])
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    # Every replica, by DNS service discovery on the compose service's name.
    assert scrape["scrape_configs"][0]["dns_sd_configs"] == [
        {"names": ["consumer"], "type": "A", "port": int(port), "refresh_interval": "15s"}
    ]
    bootstrap = consumer["environment"]["LEDGER_KAFKA_BOOTSTRAP"]
    assert bootstrap.split(":")[1] in compose["services"]["kafka"]["environment"]["KAFKA_LISTENERS"]
    # Each setting in the compose file must also parse as a valid value.
    Settings(**{k.removeprefix("LEDGER_").lower(): v for k, v in consumer["environment"].items()})


def test_dashboard_has_a_stable_uid_and_a_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "token-ledger"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    provisioned = yaml.safe_load(
        (REPO / "dashboards/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert provisioned["datasources"][0]["type"] == "prometheus"


@pytest.mark.parametrize(
    "title",
    [
        "Events/s by type and outcome",
        "Duplicates suppressed/s",
        "Consumer lag per partition",
        "Records held by open transactions",
        "Commit minus occurred_at (p50/p95/p99)",
        "Batch size",
        "Batch database time (p50/p95)",
        "Tokens/s by model",
        "Cost per hour by model",
        "Dead letters by reason",
        "Rebalances and fenced batches",
        "Ready",
    ],
)
def test_dashboard_has_the_panel(title: str) -> None:
    assert title in {panel["title"] for panel in dashboard()["panels"]}


def test_every_referenced_metric_is_exposed() -> None:
    exposition = generate_latest(LedgerMetrics().registry).decode()
    missing = referenced_metrics() - exposed_sample_names(exposition)
    assert missing == set()


def test_every_metric_is_documented_in_the_operations_guide() -> None:
    readme = (REPO / "docs" / "operations.md").read_text()
    exposition = generate_latest(LedgerMetrics().registry).decode()
    families = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}
    for family in families:
        assert f"`{family}`" in readme, family


def test_promtool_files_are_where_the_compose_stack_expects_them() -> None:
    assert Path(PROMETHEUS / "alerts.yml").exists()
    assert Path(PROMETHEUS / "alerts_test.yml").exists()
