"""deploy/kubernetes/: what docs/deploy.md (sections 11 and 12) says of the manifests holds.

Both are also played for real (tests/containers/test_pods.py); these static checks cover what a
pod run cannot show: every container hardened, no credential in any manifest, the configs load,
the grants by uid, the service account token in keyd's container only, the socket read-only for
its clients, and probes the keyd CLI accepts.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyd import config
from keyd.cli import build_parser
from tests.helpers import ROOT

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def workload(path: Path) -> dict[str, Any]:
    spec: dict[str, Any] = next(doc for doc in documents(path) if doc["kind"] in ("Deployment", "DaemonSet"))[
        "spec"
    ]["template"]["spec"]
    return spec


def keyd_config(path: Path) -> config.Config:
    configmap = next(doc for doc in documents(path) if doc["kind"] == "ConfigMap")
    return config.parse(tomllib.loads(configmap["data"]["config.toml"]), f"{path.name} ConfigMap")


def containerfile_uid() -> int:
    match = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Containerfile").read_text(), re.MULTILINE)
    assert match
    return int(match.group(1))


def test_both_patterns_are_shipped() -> None:
    assert [path.name for path in MANIFESTS] == ["node-agent.yaml", "sidecar.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_credential_in_a_manifest_and_the_login_is_the_service_accounts(path: Path) -> None:
    assert all(doc["kind"] != "Secret" for doc in documents(path))
    text = yaml.safe_dump_all(documents(path))  # what is applied: no comments, the config's included
    for word in ("secret_id", "VAULT_TOKEN", "token_file", "role_id"):
        assert word not in text
    loaded = keyd_config(path)
    assert loaded.vault.auth.method == "kubernetes" and loaded.vault.auth.role
    spec = workload(path)
    assert spec["automountServiceAccountToken"] is False
    mounted = {
        c["name"]
        for c in [*spec["containers"], *spec["initContainers"]]
        for mount in c.get("volumeMounts", [])
        if mount["mountPath"] == TOKEN_DIR
    }
    assert mounted == {"keyd"}, "the service account token in keyd's container only"
    assert loaded.vault.auth.jwt_file == f"{TOKEN_DIR}/token"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_container_is_hardened(path: Path) -> None:
    spec = workload(path)
    assert spec.get("shareProcessNamespace") in (None, False)
    for container in [*spec["containers"], *spec["initContainers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        if container["name"] == "socket-dir":  # the one root step: the socket directory made keyd's
            assert sorted(context["capabilities"]["add"]) == ["CHOWN", "FOWNER"]
            assert container["command"][:2] == ["install", "-d"]
            assert f"-o {containerfile_uid()} -g {containerfile_uid()} -m 0755" in " ".join(
                container["command"]
            )
        else:
            assert "add" not in context["capabilities"] and context["runAsNonRoot"] is True


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_keyd_container_runs_the_image_user_with_probes_the_cli_accepts(path: Path) -> None:
    spec = workload(path)
    keyd = next(c for c in spec["containers"] if c["name"] == "keyd")
    assert keyd["securityContext"]["runAsUser"] == containerfile_uid()
    assert keyd["args"] == ["run", "-c", "/etc/keyd/config.toml"]
    assert keyd["readinessProbe"]["exec"]["command"] == ["keyd", "health"]
    assert keyd["livenessProbe"]["exec"]["command"] == ["keyd", "health", "--live"]
    for probe in ("readinessProbe", "livenessProbe"):
        build_parser().parse_args(keyd[probe]["exec"]["command"][1:])
    socket_dir = next(m for m in keyd["volumeMounts"] if m["name"] == "keyd-socket")["mountPath"]
    assert keyd_config(path).server.socket == f"{socket_dir}/keyd.sock"


def test_sidecar_grants_the_app_by_its_own_uid_which_is_not_keyds() -> None:
    path = ROOT / "deploy" / "kubernetes" / "sidecar.yaml"
    spec = workload(path)
    app = next(c for c in spec["containers"] if c["name"] == "app")
    app_uid = app["securityContext"]["runAsUser"]
    assert app_uid != containerfile_uid()
    grants = keyd_config(path).grants
    assert grants and all(grant.uid == app_uid and not grant.unit for grant in grants)
    socket_mount = next(m for m in app["volumeMounts"] if m["name"] == "keyd-socket")
    assert socket_mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == "keyd-socket")
    assert "emptyDir" in volume


def test_node_agent_grants_by_uid_only_on_a_hostpath() -> None:
    path = ROOT / "deploy" / "kubernetes" / "node-agent.yaml"
    spec = workload(path)
    volume = next(v for v in spec["volumes"] if v["name"] == "keyd-socket")
    assert volume["hostPath"]["path"] == "/run/keyd"
    grants = keyd_config(path).grants
    assert grants and all(grant.uid not in (None, 0) and not grant.unit for grant in grants)
