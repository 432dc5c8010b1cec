"""The tools that check the deployment files, installed into .tools/ by `make deploy-tools`
(a step of `make test`), each only when missing (docs/development.md#deployment-checks):

- helm (the Helm chart's lint and render) and kubeconform (the rendered manifests against the
  Kubernetes schemas), built from the Go module proxy with `go install` at pinned versions;
- compose-check (devstack/compose-check/: docker-compose.yml loaded and validated by
  compose-go, the Compose Specification's reference loader that Docker Compose itself uses);
- the Kubernetes JSON schemas that kubeconform reads. kubeconform downloads them from a web
  site at run time; these machines reach only package registries, so they are made here from
  the schemas that the `kubernetes-validate` package (a dev dependency) ships for each
  Kubernetes version, made standalone (kubeconform's layout: one self-contained file per kind).

    python -m devstack.deploy_tools            # install what is missing; quiet when all is there
    python -m devstack.deploy_tools --paths    # print where each tool is

A missing Go is one line naming what to install, and exit code 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

from devstack.errors import DevstackError

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".tools"
BIN = TOOLS / "bin"
STAMPS = TOOLS / "stamps"  # one empty file per tool@version installed
COMPOSE_CHECK_SOURCE = REPO / "devstack" / "compose-check"
# The Kubernetes versions the chart is checked against: the oldest it supports (Chart.yaml's
# kubeVersion) and the newest the schema package carries.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
SCHEMAS = TOOLS / "kubernetes-schemas"
MINIMUM_GO = (1, 21)  # older go commands cannot fetch the Go release a module asks for


@dataclass(frozen=True)
class GoTool:
    name: str
    package: str  # `go install` argument, version included
    version: str

    @property
    def binary(self) -> Path:
        return BIN / self.name

    @property
    def stamp(self) -> Path:
        return STAMPS / f"{self.name}@{self.version}"


HELM = GoTool("helm", "helm.sh/helm/v4/cmd/helm@v4.3.2", "v4.3.2")
KUBECONFORM = GoTool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0", "v0.8.0")
GO_TOOLS = (HELM, KUBECONFORM)
COMPOSE_CHECK = BIN / "compose-check"


def go_command() -> str:
    """The go command, or a DevstackError naming what to install."""
    go = shutil.which("go")
    how = (
        "install Go 1.26 or later (https://go.dev/dl/, unpacked to /usr/local/go with "
        "/usr/local/go/bin on PATH; Debian 12's golang-go is 1.19, too old), then run make again"
    )
    if go is None:
        raise DevstackError(
            f"token-ledger: `go` is not on PATH: helm and kubeconform are built with it; {how}"
        )
    found = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=False)
    match = re.fullmatch(r"go(\d+)\.(\d+)\S*", found.stdout.strip())
    if not match or (int(match[1]), int(match[2])) < MINIMUM_GO:
        raise DevstackError(
            f"token-ledger: {go} is {found.stdout.strip() or 'unknown'}, older than go1.21; {how}"
        )
    return go


def _go(go: str, *args: str, cwd: Path = REPO) -> None:
    env = {**os.environ, "GOBIN": str(BIN), "GOFLAGS": "-buildvcs=false"}
    if subprocess.run([go, *args], cwd=cwd, env=env, check=False).returncode != 0:
        raise DevstackError(f"token-ledger: `go {' '.join(args)}` failed (see above)")


def _compose_check_is_current() -> bool:
    if not COMPOSE_CHECK.exists():
        return False
    built = COMPOSE_CHECK.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in COMPOSE_CHECK_SOURCE.iterdir())


def install_go_tools() -> None:
    wanted = [t for t in GO_TOOLS if not (t.binary.exists() and t.stamp.exists())]
    if not wanted and _compose_check_is_current():
        return
    go = go_command()
    BIN.mkdir(parents=True, exist_ok=True)
    STAMPS.mkdir(parents=True, exist_ok=True)
    for tool in wanted:
        print(
            f"building {tool.name} {tool.version} into {BIN} (go install; minutes the first time)"
        )
        _go(go, "install", tool.package)
        for old in STAMPS.glob(f"{tool.name}@*"):
            old.unlink()
        tool.stamp.touch()
    if not _compose_check_is_current():
        print(f"building compose-check into {BIN}")
        _go(go, "build", "-o", str(COMPOSE_CHECK), ".", cwd=COMPOSE_CHECK_SOURCE)


# -- Kubernetes schemas ----------------------------------------------------------------------

_DEFINITIONS_REF = "/api/_definitions.json#/$defs/"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _local(node: Any) -> Any:
    """The node with every reference into the shared definitions made document-local."""
    if isinstance(node, dict):
        return {
            key: value.replace(_DEFINITIONS_REF, "#/$defs/")
            if key == "$ref" and isinstance(value, str)
            else _local(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local(value) for value in node]
    return node


def standalone(kind: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A kind's schema with the definitions it reaches inlined under $defs (no other file
    needed: the layout kubeconform reads)."""
    document: dict[str, Any] = _local({k: v for k, v in kind.items() if k != "$id"})
    needed: dict[str, Any] = {}
    pending = list(_refs(document))
    while pending:
        ref = pending.pop()
        if not ref.startswith("#/$defs/"):
            raise DevstackError(f"token-ledger: unexpected reference {ref!r} in the schemas")
        name = ref.removeprefix("#/$defs/")
        if name not in needed:
            needed[name] = _local(definitions[name])
            pending.extend(_refs(needed[name]))
    if needed:
        document["$defs"] = dict(sorted(needed.items()))
    return document


def schema_dir(kubernetes_version: str) -> Path:
    """Where kubeconform finds them: {{.NormalizedKubernetesVersion}}-standalone-strict."""
    return SCHEMAS / f"v{kubernetes_version}-standalone-strict"


def write_schemas(kubernetes_version: str) -> int:
    """Every kind of that Kubernetes version, strict (no property the API does not define);
    returns how many files were written."""
    source = resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{kubernetes_version}-local-strict"
    )
    definitions = json.loads(source.joinpath("_definitions.json").read_text())["$defs"]
    target = schema_dir(kubernetes_version)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = 0
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("_") or entry.name == "all.json":
            continue
        kind = json.loads(entry.read_text())
        if "x-kubernetes-group-version-kind" not in kind:
            continue  # a part of a kind (PodSpec, …), not an object one applies
        (partial / entry.name).write_text(json.dumps(standalone(kind, definitions)))
        written += 1
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return written


def install_schemas() -> None:
    stamp = SCHEMAS / f"kubernetes-validate@{version('kubernetes-validate')}"
    if stamp.exists() and all(schema_dir(v).is_dir() for v in KUBERNETES_VERSIONS):
        return
    for kubernetes_version in KUBERNETES_VERSIONS:
        count = write_schemas(kubernetes_version)
        print(
            f"wrote {count} Kubernetes {kubernetes_version} schemas to {schema_dir(kubernetes_version)}"
        )
    for old in SCHEMAS.glob("kubernetes-validate@*"):
        old.unlink()
    stamp.touch()


def main(argv: list[str]) -> int:
    if argv == ["--paths"]:
        for path in (HELM.binary, KUBECONFORM.binary, COMPOSE_CHECK, SCHEMAS):
            print(path)
        return 0
    if argv:
        print("usage: python -m devstack.deploy_tools [--paths]", file=sys.stderr)
        return 2
    try:
        install_go_tools()
        install_schemas()
    except DevstackError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
