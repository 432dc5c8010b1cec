"""devstack/deploy_tools.py: a missing or too old Go is one clear line; the Kubernetes schemas it
writes for kubeconform stand alone (no reference leaves the file) and are the package's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack import deploy_tools
from devstack.errors import DevstackError


def test_no_go_on_path_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DevstackError, match=r"`go` is not on PATH.*install Go 1\.26 or later"):
        deploy_tools.go_command()


def test_a_go_too_old_to_fetch_a_newer_release_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "go"
    fake.write_text("#!/bin/sh\necho go1.19.8\n")  # Debian 12's golang-go
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DevstackError, match=r"go1\.19\.8, older than go1\.21.*install Go 1\.26"):
        deploy_tools.go_command()


def test_main_reports_a_missing_go_in_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_go() -> str:
        raise DevstackError("token-ledger: `go` is not on PATH: …")

    monkeypatch.setattr(deploy_tools, "go_command", no_go)
    monkeypatch.setattr(deploy_tools, "_compose_check_is_current", lambda: False)
    assert deploy_tools.main([]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_a_standalone_schema_inlines_exactly_the_definitions_it_reaches() -> None:
    definitions = {
        "A": {"properties": {"b": {"$ref": "#/$defs/B"}}},
        "B": {"items": {"$ref": "#/$defs/C"}},
        "C": {"type": "string"},
        "Unused": {"type": "integer"},
    }
    kind = {
        "$id": "https://kubernetes.io/api/thing/v1",
        "properties": {"spec": {"$ref": "/api/_definitions.json#/$defs/A"}},
    }
    document = deploy_tools.standalone(kind, definitions)
    assert "$id" not in document
    assert document["properties"]["spec"] == {"$ref": "#/$defs/A"}
    assert sorted(document["$defs"]) == ["A", "B", "C"]


@pytest.mark.parametrize("version", deploy_tools.KUBERNETES_VERSIONS)
def test_the_written_schemas_have_every_kind_of_the_chart_and_no_outside_reference(
    version: str,
) -> None:
    folder = deploy_tools.schema_dir(version)
    assert folder.is_dir(), f"{folder} is missing: `make deploy-tools` writes it"
    for name in (
        "deployment-apps-v1.json",
        "job-batch-v1.json",
        "service-v1.json",
        "serviceaccount-v1.json",
        "poddisruptionbudget-policy-v1.json",
        "configmap-v1.json",
        "secret-v1.json",
    ):
        text = (folder / name).read_text()
        assert "/api/_definitions.json" not in text, name
        schema = json.loads(text)
        assert schema["additionalProperties"] is False, name  # strict
        for ref in _refs(schema):
            assert ref.removeprefix("#/$defs/") in schema["$defs"], (name, ref)


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []
