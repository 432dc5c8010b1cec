"""Prometheus for real (the Debian package): the committed config and rules pass promtool,
their unit tests fire and clear every alert, and against a live consumer every dashboard and
alert expression runs and returns data, and the cost/token counters add up to the ledger."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic
from devstack.processes import free_port
from tests.integration.harness import ConsumerProcess, Stack, wait_for
from tests.observability import (
    PROMETHEUS,
    alert_expressions,
    dashboard_expressions,
    exposed_sample_names,
    referenced_metrics,
    to_promql,
)

# Expressions that must come back empty in a clean run, and why.
EXPECTED_EMPTY = {
    "TokenLedgerDown": "the consumer is up",
    "TokenLedgerAbsent": "the consumer is scraped",
    "TokenLedgerLagGrowing": "the consumer keeps up",
    "TokenLedgerStalled": "the consumer is caught up and committing",
    "TokenLedgerDatabaseRetryStorm": "the database never failed in this run",
    "TokenLedgerFencedBatches": "a single consumer is never fenced",
    "Database retries by SQLSTATE / A": "no retry happened, so the labelled counter has no series",
    "TokenLedgerOffsetReset": "every stored offset is inside its partition's log",
    "TokenLedgerPartitionStopped": "no partition stopped",
    "Offset resets and stopped partitions / A": "no offset reset, so the counter has no series",
    "Offset resets and stopped partitions / B": "no partition stopped, so the gauge has no series",
    "TokenLedgerBillingBacklogGrowing": "the relay publishes every revision as it comes",
    "TokenLedgerBudgetCrossings": "no budget exists in this run",
    "Budget alerts by threshold / A": "no budget alert was published, so the counter has no series",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install -y prometheus (`make test` does)"
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(command: list[str]) -> None:
    result = subprocess.run(
        [_tool("promtool"), *command], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


class Prometheus:
    def __init__(self, target: str, workdir: Path) -> None:
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
        job = config["scrape_configs"][0]  # compose finds consumers by DNS; here, one address
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def is_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/-/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def ready(self) -> bool:
        return await asyncio.to_thread(self.is_ready)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="token-ledger-prom-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_live_dashboard_and_alert_queries_and_counter_totals(
    kafka_bootstrap: str, ledger_url: str, workdir: Path
) -> None:
    stack = Stack.fresh(kafka_bootstrap, ledger_url)
    await stack.create_topic()
    consumer = ConsumerProcess(stack.env(LEDGER_MAX_BATCH="50"), workdir / "consumer.log").start()
    prometheus = Prometheus(f"127.0.0.1:{consumer.port}", workdir)
    try:
        await wait_for(prometheus.ready, within=60, what="prometheus ready")
        await wait_for(lambda: _scraped(prometheus), within=60, what="first scrapes")
        start = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
        for seed in (31, 32):  # two waves, so every rate window sees traffic
            records, _ = plan_traffic(
                TrafficConfig(
                    threads=60,
                    turns_per_thread=4,
                    seed=seed,
                    duplicate_rate=0.3,
                    shuffle_rate=0.5,
                    poison_rate=0.08,  # every poison kind in both waves: rates need two samples
                    start=start,
                )
            )
            await stack.publish(records)
            await wait_for(stack.caught_up, within=60, what="consumer caught up")
            await wait_for(
                lambda: _counter_settled(prometheus, consumer), within=30, what="a scrape after it"
            )
            # A rate needs two samples of a series in its window: let a few scrapes pass.
            await wait_for(
                lambda: _samples_of_every_series(prometheus, 3), within=30, what="samples"
            )

        _, exposition = consumer.http("/metrics")
        assert referenced_metrics() - exposed_sample_names(exposition) == set()

        expressions = {**dashboard_expressions(), **alert_expressions()}
        empty_unexpectedly, data_unexpectedly = [], []
        for name, expr in expressions.items():
            result = prometheus.query(to_promql(expr))
            if name in EXPECTED_EMPTY and result:
                data_unexpectedly.append(name)
            elif name not in EXPECTED_EMPTY and not result:
                empty_unexpectedly.append(name)
        assert empty_unexpectedly == []
        assert data_unexpectedly == []

        conn = await stack.connect()
        try:
            ledger = dict(
                await conn.fetchrow(
                    "SELECT sum(cost_micros) AS cost, sum(prompt_tokens) AS prompt,"
                    " sum(completion_tokens) AS completion, sum(total_tokens) AS total"
                    " FROM token_usage"
                )
            )
        finally:
            await conn.close()
        assert _net(prometheus, "token_ledger_cost_micros", "") == ledger["cost"]
        for kind in ("prompt", "completion", "total"):
            assert _net(prometheus, "token_ledger_tokens", f'kind="{kind}"') == ledger[kind], kind
    finally:
        prometheus.stop()
        consumer.stop_quietly()


def _net(prometheus: Prometheus, metric: str, selector: str) -> int:
    """Counted minus reversed: what became authoritative, net of what was superseded."""
    result = prometheus.query(
        f"sum({metric}_total{{{selector}}}) - (sum({metric}_reversed_total{{{selector}}}) or vector(0))"
    )
    return int(float(result[0]["value"][1]))


async def _samples_of_every_series(prometheus: Prometheus, count: int) -> bool:
    for metric in (
        "token_ledger_events_total",
        "token_ledger_dead_letters_total",
        "token_ledger_tokens_total",
        "token_ledger_cost_micros_total",
    ):
        result = prometheus.query(f"min(count_over_time({metric}[1m]))")
        if not result or float(result[0]["value"][1]) < count:
            return False
    return True


async def _scraped(prometheus: Prometheus) -> bool:
    return bool(prometheus.query('up{job="token-ledger"} == 1'))


async def _counter_settled(prometheus: Prometheus, consumer: ConsumerProcess) -> bool:
    """Prometheus holds the consumer's current totals (scraped after the last commit)."""
    _, exposition = consumer.http("/metrics")
    line = next(
        (
            row
            for row in exposition.splitlines()
            if row.startswith("token_ledger_batch_size_count ")
        ),
        "",
    )
    result = prometheus.query("token_ledger_batch_size_count")
    return bool(line and result and float(result[0]["value"][1]) == float(line.split()[1]))
