"""A single-node Apache Kafka 4.x broker (combined broker+controller, KRaft) from Maven jars.

`devstack/kafka/pom.xml` pins the version; Maven copies the broker's runtime closure into a
cache directory keyed by the pom's hash, so later runs (and later throw-away brokers) reuse it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from devstack import kafka_wire
from devstack.errors import DevstackError
from devstack.processes import is_alive, require_free_port, stop_process_group, tail

POM = Path(__file__).parent / "kafka" / "pom.xml"
HEAP = "-Xmx512m"

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def cache_dir() -> Path:
    root = os.environ.get("TOKEN_LEDGER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "token-ledger"
    )
    pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return Path(root) / f"kafka-{pom_hash}"


def ensure_jars() -> Path:
    """The directory of broker jars, resolved by Maven on first use and reused afterwards."""
    lib = cache_dir() / "lib"
    if lib.is_dir():
        return lib
    if shutil.which("java") is None:
        raise DevstackError(
            "Kafka needs Java 17+: `java` is not on PATH (apt-get install openjdk-17-jre-headless)"
        )
    if shutil.which("mvn") is None:
        raise DevstackError(
            "fetching the Kafka jars needs Maven: `mvn` is not on PATH (apt-get install maven)"
        )
    partial = lib.with_name("lib.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DevstackError(
            f"Maven could not resolve the Kafka jars:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        )
    partial.rename(lib)  # only a complete download becomes the cache
    return lib


def _cluster_id() -> str:
    # 16 random bytes, URL-safe base64 without padding; a leading '-' would read as an option.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@dataclass
class KafkaBroker:
    workdir: Path
    port: int
    controller_port: int
    pid: int | None = None
    # Optional SASL_PLAINTEXT listener with SCRAM-SHA-256 users (name -> password), for
    # testing the consumer's Kafka security settings against a real broker.
    sasl_port: int | None = None
    scram_users: dict[str, str] = field(default_factory=dict)
    # Optional SSL listener; the keystore is one PEM file: PKCS#8 key, then the certificate chain.
    ssl_port: int | None = None
    ssl_keystore: Path | None = None
    # Optional ACLs (KRaft's StandardAuthorizer): what no ACL names stays open to everyone, and
    # the PLAINTEXT listeners' ANONYMOUS principal is a super user, so only what a test denies
    # is denied.
    authorizer: bool = False

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()  # postgres and java run with other cwds

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "logs" / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "kafka.pid"

    def _listeners(self) -> tuple[str, str, list[str]]:
        """(listeners, security protocol map, extra properties) for the configured ports."""
        listeners = [
            f"PLAINTEXT://127.0.0.1:{self.port}",
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
        ]
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        extra: list[str] = []
        if self.sasl_port is not None:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            extra = [
                "listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-256",
                "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ]
        if self.ssl_port is not None and self.ssl_keystore is not None:
            listeners.append(f"SSL://127.0.0.1:{self.ssl_port}")
            protocols += ",SSL:SSL"
            extra += [
                "listener.name.ssl.ssl.keystore.type=PEM",
                f"listener.name.ssl.ssl.keystore.location={self.ssl_keystore}",
            ]
        if self.authorizer:
            extra += [
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found=true",
                "super.users=User:ANONYMOUS",
            ]
        return ",".join(listeners), protocols, extra

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    def _write_config(self) -> Path:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        props = self.workdir / "server.properties"
        listeners, protocols, extra = self._listeners()
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                    f"listeners={listeners}",
                    f"advertised.listeners={listeners}",
                    "inter.broker.listener.name=PLAINTEXT",
                    "controller.listener.names=CONTROLLER",
                    f"listener.security.protocol.map={protocols}",
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=1",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "num.io.threads=2",
                    "num.network.threads=2",
                    "background.threads=4",
                    *extra,
                    "",
                ]
            )
        )
        (self.workdir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file))
        return props

    def start(self, timeout: float = 90.0) -> None:
        require_free_port(self.port, "Kafka")
        require_free_port(self.controller_port, "Kafka controller")
        for extra_port, name in ((self.sasl_port, "SASL"), (self.ssl_port, "SSL")):
            if extra_port is not None:
                require_free_port(extra_port, f"Kafka {name}")
        lib = ensure_jars()
        self.workdir.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        classpath = f"{lib}/*"
        if not (self.workdir / "data" / "meta.properties").exists():
            self._format(props, classpath)
        with open(self.workdir / "kafka.out", "ab") as out:
            proc = subprocess.Popen(
                [
                    "java",
                    "-Xms256m",
                    HEAP,
                    "-XX:+UseSerialGC",
                    "-Djava.awt.headless=true",
                    f"-Dkafka.logs.dir={self.workdir / 'logs'}",
                    f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                    "-cp",
                    classpath,
                    "kafka.Kafka",
                    str(props),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() takes every child with it
            )
        self.pid = proc.pid
        self.pid_file.write_text(str(proc.pid))
        self._wait_ready(timeout)

    def _format(self, props: Path, classpath: str) -> None:
        result = subprocess.run(
            [
                "java",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                _cluster_id(),
                "-c",
                str(props),
                *(
                    arg
                    for name, password in self.scram_users.items()
                    for arg in ("--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]")
                ),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevstackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.pid is not None and not is_alive(self.pid):
                raise DevstackError(
                    f"Kafka broker exited during start-up; tail of {self.log_file}:\n{tail(self.log_file)}"
                    f"\n{tail(self.workdir / 'kafka.out', 10)}"
                )
            try:
                metadata = kafka_wire.cluster_metadata("127.0.0.1", self.port, timeout=2.0)
                if 1 in metadata.broker_ids:
                    return
                last_error = f"metadata names brokers {metadata.broker_ids}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.25)
        self.stop()
        raise DevstackError(
            f"Kafka broker did not answer a metadata request within {timeout:.0f}s ({last_error}); "
            f"tail of {self.log_file}:\n{tail(self.log_file)}"
        )

    def stop(self, grace_seconds: float = 20.0) -> None:
        if self.pid is not None:
            stop_process_group(self.pid, grace_seconds)
            self.pid = None
        self.pid_file.unlink(missing_ok=True)
