"""The Helm chart (deploy/token-ledger, docs/operations.md#deploying-with-helm): `helm lint`,
`helm template` with the default values and with every optional feature on
(deploy/token-ledger/ci/all-features-values.yaml), every rendered manifest validated by
kubeconform against the Kubernetes schemas of the oldest and the newest version it supports,
and what the manifests must say. helm, kubeconform and the schemas come from
`make deploy-tools` (devstack/deploy_tools.py).

kubeconform skips the custom resources (ServiceMonitor, ScaledObject, TriggerAuthentication):
their schemas come from CRDs of prometheus-operator and KEDA, which no package registry ships;
the tests below check their fields by hand."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.deploy_tools import HELM, KUBECONFORM, KUBERNETES_VERSIONS, SCHEMAS
from tests.unit.repo.test_docs import setting_variables

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "token-ledger"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
CUSTOM_KINDS = ("ServiceMonitor", "ScaledObject", "TriggerAuthentication")
VALUES = {"default": (), "all-features": ("-f", str(ALL_FEATURES))}


def run(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert tool.exists(), f"{tool} is missing: `make deploy-tools` builds it"
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


@functools.cache
def rendered(values: str, *extra: str) -> str:
    result = run(HELM.binary, "template", "ledger", str(CHART), *VALUES[values], *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


def manifests(values: str, *extra: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered(values, *extra)) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint_passes_strictly(values: str) -> None:
    result = run(HELM.binary, "lint", "--strict", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("kubernetes", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", VALUES)
def test_every_manifest_is_valid_for_the_kubernetes_version(
    values: str, kubernetes: str, tmp_path: Path
) -> None:
    path = tmp_path / "manifests.yaml"
    path.write_text(rendered(values))
    location = f"{SCHEMAS}/{{{{.NormalizedKubernetesVersion}}}}-standalone{{{{.StrictSuffix}}}}"
    result = run(
        KUBECONFORM.binary,
        "-strict",
        "-summary",
        "-kubernetes-version",
        kubernetes,
        "-schema-location",
        location + "/{{.ResourceKind}}{{.KindSuffix}}.json",
        "-skip",
        ",".join(CUSTOM_KINDS),
        str(path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    docs = manifests(values)
    built_in = sum(d["kind"] not in CUSTOM_KINDS for d in docs)
    assert f"Valid: {built_in}, Invalid: 0, Errors: 0" in result.stdout, result.stdout


def test_kubeconform_refuses_a_manifest_the_api_would_refuse(tmp_path: Path) -> None:
    """The validation bites: a misspelled field and a wrong type in the rendered Deployment."""
    broken = rendered("default").replace("readOnlyRootFilesystem:", "readOnlyRootFilesytem:")
    broken = broken.replace("replicas: 2", 'replicas: "two"')
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    location = f"{SCHEMAS}/{{{{.NormalizedKubernetesVersion}}}}-standalone{{{{.StrictSuffix}}}}"
    result = run(
        KUBECONFORM.binary,
        "-strict",
        "-kubernetes-version",
        KUBERNETES_VERSIONS[0],
        "-schema-location",
        location + "/{{.ResourceKind}}{{.KindSuffix}}.json",
        str(path),
    )
    assert result.returncode == 1
    assert "readOnlyRootFilesytem" in result.stdout and "/spec/replicas" in result.stdout


def test_the_defaults_run_the_consumer_with_the_relay_inside_and_migrate_as_a_hook() -> None:
    docs = manifests("default")
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    consumer = one(docs, "Deployment", "ledger-token-ledger-consumer")
    assert consumer["spec"]["replicas"] == 2
    # api.enabled is off by default: no `serve`, no Service or PDB of its own.
    assert not [d for d in docs if d["metadata"]["name"].endswith("-api")]
    assert [container(d)["args"][0] for d in docs if d["kind"] == "Deployment"] == ["consume"]
    assert container(consumer)["args"] == ["consume"]
    assert "LEDGER_RELAY" not in env(consumer)  # the relay runs inside consume
    job = one(docs, "Job", "ledger-token-ledger-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["args"] == ["migrate"]
    # A hook runs before the release's other objects exist: it must need none of them.
    assert "envFrom" not in container(job)
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]
    pdb = one(docs, "PodDisruptionBudget", "ledger-token-ledger-consumer")
    selector = consumer["spec"]["selector"]["matchLabels"]
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": selector},
    }
    # One out, then one in: a surge member beyond the partitions would be assigned nothing,
    # stay unready, and hold the rollout.
    assert consumer["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize("values", VALUES)
def test_every_workload_is_probed_locked_down_and_sized(values: str) -> None:
    docs = manifests(values)
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Job")]
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        box = container(workload)
        assert box["securityContext"]["readOnlyRootFilesystem"] is True
        assert box["securityContext"]["allowPrivilegeEscalation"] is False
        assert box["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert {"cpu", "memory"} <= set(box["resources"]["requests"])
        assert {"name": "tmp", "mountPath": "/tmp"} in box["volumeMounts"]
        if workload["kind"] == "Job":
            continue
        # The usage API serves /healthz and /metrics on its own port (`serve --port`).
        name, ready, expected = {
            "consume": ("metrics", "/readyz", configmap["LEDGER_METRICS_PORT"]),
            "relay": ("metrics", "/readyz", configmap["LEDGER_RELAY_METRICS_PORT"]),
            "serve": ("http", "/healthz", box["args"][-1]),
        }[box["args"][0]]
        (port,) = box["ports"]
        assert port["name"] == name
        assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": name}
        assert box["readinessProbe"]["httpGet"] == {"path": ready, "port": name}
        assert str(port["containerPort"]) == expected
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == expected


@pytest.mark.parametrize("values", VALUES)
def test_secrets_come_from_existing_secrets_and_every_variable_is_a_setting(values: str) -> None:
    docs = manifests(values)
    known = setting_variables()
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert set(configmap) <= known
    assert not {"LEDGER_DATABASE_URL", "LEDGER_KAFKA_SASL_PASSWORD"} & set(configmap)
    assert not [d for d in docs if d["kind"] == "Secret"]  # the chart never holds one
    for workload in (d for d in docs if d["kind"] in ("Deployment", "Job")):
        variables = env(workload)
        assert set(variables) <= known
        if container(workload)["args"][0] == "serve":  # its own role, never the ledger's
            assert "LEDGER_DATABASE_URL" not in variables
            assert "secretKeyRef" in variables["LEDGER_API_DATABASE_URL"]
        else:
            assert "secretKeyRef" in variables["LEDGER_DATABASE_URL"]


def test_every_optional_feature_renders_as_documented() -> None:
    docs = manifests("all-features")
    consumer = one(docs, "Deployment", "ledger-token-ledger-consumer")
    relay = one(docs, "Deployment", "ledger-token-ledger-relay")
    # relay.standalone: its own Deployment; the consumers leave the outbox to it.
    assert container(relay)["args"] == ["relay"]
    assert env(consumer)["LEDGER_RELAY"] == "false"
    assert "LEDGER_RELAY" not in env(relay)
    # Kafka SASL from the existing Secret; the CA mounted where LEDGER_KAFKA_SSL_CAFILE says.
    for workload in (consumer, relay):
        variables = env(workload)
        for name, key in (("USERNAME", "username"), ("PASSWORD", "password")):
            reference = variables[f"LEDGER_KAFKA_SASL_{name}"]["secretKeyRef"]
            assert reference == {"name": "ledger-kafka", "key": key}
        mounts = {m["name"]: m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert mounts["kafka-ca"] == "/etc/token-ledger/kafka-ca"
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert configmap["LEDGER_KAFKA_SSL_CAFILE"] == "/etc/token-ledger/kafka-ca/ca.crt"
    assert configmap["LEDGER_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    # KEDA owns the consumers' replica count, on the group's lag, up to the partitions.
    assert "replicas" not in consumer["spec"]
    scaled = one(docs, "ScaledObject", "ledger-token-ledger-consumer")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": consumer["metadata"]["name"]}
    assert scaled["spec"]["maxReplicaCount"] == 6
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == configmap["LEDGER_GROUP_ID"]
    assert trigger["metadata"]["topic"] == configmap["LEDGER_TOPIC"]
    assert trigger["metadata"]["bootstrapServers"] == configmap["LEDGER_KAFKA_BOOTSTRAP"]
    assert (trigger["metadata"]["sasl"], trigger["metadata"]["tls"]) == ("scram_sha512", "enable")
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert {p["parameter"] for p in auth["spec"]["secretTargetRef"]} == {
        "username",
        "password",
        "ca",
    }
    # A ServiceMonitor over the metrics Services of both workloads (the usage API's below).
    monitor = one(docs, "ServiceMonitor", "ledger-token-ledger")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    services = [
        d for d in docs if d["kind"] == "Service" and not d["metadata"]["name"].endswith("-api")
    ]
    assert len(services) == 2
    for service in services:
        labels = service["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["ports"][0]["name"] == "metrics"
        assert service["spec"]["publishNotReadyAddresses"] is True  # unready ones are scraped


def test_the_usage_api_renders_as_documented() -> None:
    docs = manifests("all-features")
    api = one(docs, "Deployment", "ledger-token-ledger-api")
    assert api["spec"]["replicas"] == 3
    assert container(api)["args"] == ["serve", "--host", "0.0.0.0", "--port", "8081"]
    assert (
        container(api)["image"]
        == container(one(docs, "Deployment", "ledger-token-ledger-consumer"))["image"]
    )
    variables = env(api)
    assert variables["LEDGER_API_DATABASE_URL"] == {
        "secretKeyRef": {"name": "ledger-api-database", "key": "LEDGER_API_DATABASE_URL"}
    }
    assert variables["LEDGER_API_STATEMENT_TIMEOUT"] == "10"
    # No Kafka setting: these values' SASL mechanism without its secret's username would stop
    # serve at start (it reads no Kafka setting at all).
    assert "envFrom" not in container(api)
    assert not [name for name in variables if name.startswith("LEDGER_KAFKA_")]
    assert variables["LEDGER_LOG_FORMAT"] == "json"  # the log's settings from `config` do
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["example.com/team"] == "billing"
    # Its clients reach the ready pods through a ClusterIP Service on api.port.
    service = one(docs, "Service", "ledger-token-ledger-api")
    selector = api["spec"]["selector"]["matchLabels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8081, "targetPort": "http", "protocol": "TCP"}
    ]
    assert "publishNotReadyAddresses" not in service["spec"]
    # Its /metrics is scraped on that port, and a drain leaves the other replicas serving.
    monitor = one(docs, "ServiceMonitor", "ledger-token-ledger")
    assert {"port": "http", "path": "/metrics", "interval": "30s"} in monitor["spec"]["endpoints"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    pdb = one(docs, "PodDisruptionBudget", "ledger-token-ledger-api")
    assert pdb["spec"]["selector"] == {"matchLabels": selector}
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--set", "consumer.replicas=4"), "consumer.replicas (4) exceeds kafka.partitions (3)"),
        (
            ("--set", "keda.enabled=true", "--set", "keda.maxReplicas=5"),
            "keda.maxReplicas (5) exceeds kafka.partitions (3)",
        ),
        (("--set", "kafka.sasl.mechanism=PLAIN"), "kafka.sasl.existingSecret must name"),
        (("--set", "relay.standalon=true"), "additional properties 'standalon' not allowed"),
        (("--set", "kafka.securityProtocol=SASL_SSL"), "kafka.sasl.mechanism must name"),
        (
            ("--set", "kafka.sasl.mechanism=PLAIN", "--set", "kafka.sasl.existingSecret=s"),
            "use SASL_PLAINTEXT or SASL_SSL",
        ),
        (
            ("--set", "keda.enabled=true", "--set", "keda.minReplicas=0"),
            "nothing would publish usage revisions at zero",
        ),
        (("--set", "api.enabled=true"), "api.databaseUrlSecret.name must name the existing"),
        (("--set-json", "api.statementTimeout=0"), "/api/statementTimeout"),
        # Helm reads numbers as floats: 33554432 would reach the process as 3.3554432e+07.
        (("--set-json", 'config={"LEDGER_MAX_BATCH_BYTES":33554432}'), "want string"),
    ],
    ids=[
        "replicas-over-partitions",
        "keda-over-partitions",
        "sasl-without-secret",
        "typo",
        "sasl-without-mechanism",
        "mechanism-without-sasl",
        "keda-to-zero-with-the-relay-inside",
        "api-without-its-secret",
        "api-statement-timeout-zero",
        "config-number",
    ],
)
def test_values_that_cannot_work_are_refused_at_render(extra: tuple[str, ...], says: str) -> None:
    result = run(HELM.binary, "template", "ledger", str(CHART), *extra)
    assert result.returncode == 1
    assert says in result.stderr, result.stderr


def test_keda_reaches_the_brokers_by_the_name_given_for_its_namespace() -> None:
    extra = ("--set", "keda.enabled=true", "--set", "keda.bootstrapServers=kafka.ns.svc:9092")
    (scaled,) = [doc for doc in manifests("default", *extra) if doc["kind"] == "ScaledObject"]
    assert scaled["spec"]["triggers"][0]["metadata"]["bootstrapServers"] == "kafka.ns.svc:9092"
