"""The shipped manifests (deploy/kubernetes/) run for real with `podman kube play`: keyd's image
built from this checkout, keyd logging in to the session's real OpenBao with Vault's JWT auth.

The sidecar: an app container and an intruder container of another uid in the same pod.
Substituted for the test, and nothing else: the images (keyd's; the app and the intruder run
keyd's image too, for its Python client), the ConfigMap's config (this OpenBao, a jwt login whose
token is a file the test writes, since podman projects no service account token), one replica,
host networking (OpenBao listens on 127.0.0.1), and restartPolicy OnFailure (podman 4.3 restarts
a finished init container under Always). The intruder container is added by the test.

The node agent: its DaemonSet's pod template played as a Pod (podman plays no DaemonSet), the
hostPath a fresh root-owned directory, and other pods' containers (`podman run`) mounting it.

Real parts: podman with runc, pods with separate PID namespaces, the emptyDir and the hostPath
shared by the containers, the init containers preparing them, real uids, a real cgroup named like
a system unit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import jwt
import pytest
import yaml

from keyd.ops.dev import BaoServer
from tests.adversarial.support_peers import Cgroups
from tests.containers.podman import Podman
from tests.helpers import to_toml, wait_until
from tests.integration.sysusers import CLIENT
from tests.integration.test_workload_auth import JwtMount

ROOT = Path(__file__).resolve().parents[2]
SIDECAR = ROOT / "deploy" / "kubernetes" / "sidecar.yaml"
NODE_AGENT = ROOT / "deploy" / "kubernetes" / "node-agent.yaml"
NODE_POD = "keyd-node"
POD = "chat-backend-pod-0"  # podman names the Deployment's first (only) pod so
APP_UID, INTRUDER_UID, KEYD_UID = 10002, 10003, 10001
UNIT = "talkjs-app.service"  # the cgroup both callers are placed in
SOCKET = "/run/keyd/keyd.sock"

# CLIENT (tests/integration/sysusers.py), started once the test has placed this process in a cgroup:
# it prints its pid as its own PID namespace numbers it, then waits for a line on stdin.
WAITING_CLIENT = "import os, sys\nprint(os.getpid(), flush=True)\nsys.stdin.readline()\n" + CLIENT

# What another uid in the pod tries against keyd's socket directory: each errno (0 = it worked).
TAMPER = r"""
import json, os
out = {}
for name, attempt in (
    ("unlink", lambda: os.unlink("/run/keyd/keyd.sock")),
    ("rename", lambda: os.rename("/run/keyd/keyd.sock", "/run/keyd/old.sock")),
    ("create", lambda: os.close(os.open("/run/keyd/planted", os.O_CREAT | os.O_WRONLY, 0o666))),
    ("chmod", lambda: os.chmod("/run/keyd", 0o777)),
):
    try:
        attempt()
        out[name] = 0
    except OSError as exc:
        out[name] = exc.errno
print(json.dumps(out))
"""


def played_manifest(image: str, config: str, token_dir: Path) -> list[dict[str, Any]]:
    """The shipped sidecar's ConfigMap and Deployment with this test's substitutions."""
    docs = [doc for doc in yaml.safe_load_all(SIDECAR.read_text()) if doc]
    configmap = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    configmap["data"]["config.toml"] = config
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    spec["restartPolicy"] = "OnFailure"
    containers = {c["name"]: c for c in spec["containers"]}
    for container in [*spec["initContainers"], *spec["containers"]]:
        container["image"] = image
    app = containers["app"]
    app["command"] = ["sleep", "infinity"]
    # The worst case for the attack: another uid of the pod mounting the socket volume read-write.
    intruder = json.loads(json.dumps(app))
    intruder["name"] = "intruder"
    intruder["securityContext"].update(runAsUser=INTRUDER_UID, runAsGroup=INTRUDER_UID)
    intruder["volumeMounts"] = [{"name": "keyd-socket", "mountPath": "/run/keyd"}]
    spec["containers"].append(intruder)
    volumes = {v["name"]: v for v in spec["volumes"]}
    volumes["vault-token"].pop("projected")
    volumes["vault-token"]["hostPath"] = {"path": str(token_dir), "type": "Directory"}
    return [configmap, deployment]


def node_agent_manifest(image: str, config: str, token_dir: Path, node_dir: Path) -> list[dict[str, Any]]:
    """The shipped node agent's ConfigMap, and its DaemonSet's pod template as the Pod it runs on
    this "node" (podman plays no DaemonSet), with the sidecar's substitutions and ``node_dir``
    standing for the node's /run/keyd."""
    docs = [doc for doc in yaml.safe_load_all(NODE_AGENT.read_text()) if doc]
    configmap = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    daemonset = next(doc for doc in docs if doc["kind"] == "DaemonSet")
    configmap["data"]["config.toml"] = config
    spec = daemonset["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    spec["restartPolicy"] = "OnFailure"
    for container in [*spec["initContainers"], *spec["containers"]]:
        container["image"] = image
    volumes = {v["name"]: v for v in spec["volumes"]}
    volumes["vault-token"].pop("projected")
    volumes["vault-token"]["hostPath"] = {"path": str(token_dir), "type": "Directory"}
    volumes["keyd-socket"]["hostPath"]["path"] = str(node_dir)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NODE_POD}, "spec": spec}
    return [configmap, pod]


def keyd_config(bao: BaoServer, mount: JwtMount, path: str, grants: list[dict[str, Any]]) -> str:
    """The ConfigMap's config with this OpenBao, this jwt mount and these grants."""
    auth = {key: value for key, value in mount.auth.items() if key != "jwt_file"}  # the default file
    return to_toml(
        {
            "server": {"socket": SOCKET, "socket_mode": "0666"},
            "vault": {"address": bao.address, "timeout": "2s", "auth": auth},
            "refresh": {"interval": "30s", "retry_min": "0.2s", "retry_max": "1s"},
            "apps": {"default": {"app_id": "tTestApp", "path": path}},
            "grant": grants,
            "log": {"format": "json"},
        }
    )


class Pod:
    """The played pod: its containers by manifest name, commands run in them."""

    def __init__(self, podman: Podman, manifest: Path, name: str, shipped: Path) -> None:
        self.podman = podman
        self.manifest = manifest
        self.pod = name
        self.shipped = shipped  # the manifest in deploy/kubernetes/ it was made from

    def name(self, container: str) -> str:
        return f"{self.pod}-{container}"

    def exec(self, container: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.name(container), *argv, check=check, timeout=60)

    def state(self, container: str) -> dict[str, Any]:
        doc = json.loads(self.podman.run("inspect", self.name(container)).stdout)[0]
        return {
            "pid": doc["State"]["Pid"],
            "started": doc["State"]["StartedAt"],
            "running": doc["State"]["Running"],
        }

    def logs(self, container: str) -> str:
        done = self.podman.run("logs", self.name(container))
        return done.stdout + done.stderr

    def client_in_cgroup(
        self, container: str, uid: int, cgroups: Cgroups, requests: list[Any]
    ) -> dict[str, Any]:
        """CLIENT as ``uid`` in ``container``, its process placed by the host in UNIT's cgroup."""
        command = ["podman", "exec", "-i", "--user", str(uid), self.name(container), "python3", "-c"]
        process = subprocess.Popen(
            [*command, WAITING_CLIENT, SOCKET, json.dumps(requests)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.podman.env,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            inner = int(process.stdout.readline())
            host = host_pid(self.state(container)["pid"], inner)
            for procs in cgroups.make(f"system.slice/{UNIT}"):
                Path(procs).write_text(str(host))
            assert f"/system.slice/{UNIT}" in Path(f"/proc/{host}/cgroup").read_text()
            process.stdin.write("go\n")
            process.stdin.flush()
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
            process.wait(10)
        assert out, err
        result: dict[str, Any] = json.loads(out)
        return result


def host_pid(leader: int, inner: int) -> int:
    """The host's pid of the process that the PID namespace of ``leader`` numbers ``inner``."""
    namespace = os.readlink(f"/proc/{leader}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != namespace:
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
        if nspid[-1] == str(inner):
            return int(entry.name)
    raise AssertionError(f"no process numbered {inner} in {leader}'s PID namespace")


class Login:
    """A jwt login for keyd: the mount, and the token file in a directory podman mounts where the
    kubelet would project the service account token."""

    def __init__(self, root: hvac.Client, workdir: Path) -> None:
        self.token_dir = workdir / "serviceaccount"
        self.token_dir.mkdir()
        for directory in (workdir, self.token_dir):
            os.chmod(directory, 0o755)  # noqa: S103 - keyd's uid in the container reads the token
        self.mount = JwtMount(root, workdir)
        self.mount.jwt_file = self.token_dir / "token"
        self.mount.mint()
        os.chmod(self.mount.jwt_file, 0o644)


@contextlib.contextmanager
def played(
    podman: Podman, docs: list[dict[str, Any]], workdir: Path, name: str, shipped: Path
) -> Iterator[Pod]:
    manifest = workdir / shipped.name
    manifest.write_text(yaml.safe_dump_all(docs))
    try:
        podman.run("kube", "play", str(manifest), timeout=180)
        yield Pod(podman, manifest, name, shipped)
    finally:
        podman.run("kube", "play", "--down", str(manifest), check=False, timeout=120)
        for doc in docs:  # podman keeps a ConfigMap's volume after --down
            if doc["kind"] == "ConfigMap":
                podman.run("volume", "rm", "--force", doc["metadata"]["name"], check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="keyd-pod-"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def pod(
    podman: Podman,
    keyd_image: str,
    bao: BaoServer,
    root: hvac.Client,
    secret_path: tuple[str, str],
    workdir: Path,
) -> Iterator[Pod]:
    login = Login(root, workdir)
    grants = [
        # Would match the app's uid in this unit's cgroup if keyd could see its pid.
        {"uid": APP_UID, "unit": UNIT, "types": ["user", "app"]},
        {"uid": APP_UID, "types": ["user"]},
    ]
    config = keyd_config(bao, login.mount, secret_path[0], grants)
    docs = played_manifest(keyd_image, config, login.token_dir)
    with played(podman, docs, workdir, POD, SIDECAR) as running:
        yield running


def probe(pod: Pod, kind: str) -> int:
    """Run the manifest's probe command of ``kind`` in keyd's container, as the kubelet would."""
    workload = next(
        doc
        for doc in yaml.safe_load_all(pod.shipped.read_text())
        if doc and doc["kind"] in ("Deployment", "DaemonSet")
    )
    keyd = next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "keyd")
    return pod.exec("keyd", *keyd[kind]["exec"]["command"]).returncode


def test_sidecar_pod_serves_the_app_by_uid_refuses_other_uids_and_survives_app_restarts(
    pod: Pod, secret_path: tuple[str, str], cgroups: Cgroups
) -> None:
    key = secret_path[1]
    try:
        wait_until(lambda: probe(pod, "readinessProbe") == 0, timeout=60, interval=0.5)
    except AssertionError:
        status = pod.podman.run("ps", "-a", "--pod", "--format", "{{.Names}} {{.Status}}").stdout
        raise AssertionError(
            f"keyd not ready (readinessProbe):\n{status}\n{pod.logs('keyd')[-3000:]}"
        ) from None
    assert probe(pod, "livenessProbe") == 0
    assert pod.podman.run("healthcheck", "run", pod.name("keyd"), check=False).returncode == 0, (
        "podman's healthcheck made from the livenessProbe"
    )

    # The init container made the emptyDir keyd's: 0755, owned by keyd's uid.
    listing = pod.exec("app", "stat", "-c", "%a %u %g", "/run/keyd", check=True).stdout.split()
    assert listing == ["755", str(KEYD_UID), str(KEYD_UID)]

    # The app container: a user token that verifies against the key.
    done = pod.exec("app", "keyd", "token", "--user-id", "alice")
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])
    assert (claims["iss"], claims["sub"]) == ("tTestApp", "alice")

    # Peer pid 0: the app's process in UNIT's cgroup, in another PID namespace than keyd. The
    # unit grant does not match it (no app token); the uid grant does (user token).
    result = pod.client_in_cgroup(
        "app",
        APP_UID,
        cgroups,
        [["POST", "/v1/tokens", {"user_id": "bob"}], ["POST", "/v1/tokens", {"type": "app"}]],
    )
    (user_status, user_doc), (app_status, app_doc) = result["results"]
    assert user_status == 200 and jwt.decode(user_doc["token"], key, algorithms=["HS256"])["sub"] == "bob"
    assert app_status == 403 and app_doc["error"]["code"] == "forbidden", app_doc
    # The control: the same uid in the same cgroup, but in keyd's PID namespace, so keyd sees its
    # pid and unit. The unit grant matches it: what differs is only the namespace.
    control = pod.client_in_cgroup("keyd", APP_UID, cgroups, [["POST", "/v1/tokens", {"type": "app"}]])
    ((control_status, control_doc),) = control["results"]
    assert control_status == 200, control_doc

    # Another uid of the same pod, mounting the socket volume read-write: it connects, and is refused.
    done = pod.exec("intruder", "keyd", "token", "--user-id", "alice")
    assert done.returncode == 1 and "forbidden, HTTP 403" in done.stderr, done.stderr
    assert done.stdout == ""
    tampering = json.loads(pod.exec("intruder", "python3", "-c", TAMPER, check=True).stdout)
    assert all(code in (errno.EACCES, errno.EPERM) for code in tampering.values()), tampering
    readonly = json.loads(pod.exec("app", "python3", "-c", TAMPER, check=True).stdout)
    assert all(code in (errno.EROFS, errno.EACCES, errno.EPERM) for code in readonly.values()), readonly

    # The app container crashes and is restarted; keyd's container is not, and serves it again.
    keyd_before = pod.state("keyd")
    app_before = pod.state("app")
    os.kill(app_before["pid"], signal.SIGKILL)  # a crash (podman restarts none it stopped itself)

    def restarted() -> bool:
        now = pod.state("app")
        return bool(now["running"]) and now["started"] != app_before["started"]

    wait_until(restarted, timeout=60, interval=0.2, what="the app container restarted")
    assert pod.state("keyd") == keyd_before
    done = pod.exec("app", "keyd", "token", "--user-id", "carol")
    assert done.returncode == 0, done.stderr
    assert jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])["sub"] == "carol"
    assert probe(pod, "readinessProbe") == 0 and probe(pod, "livenessProbe") == 0

    # The audit lines (keyd's standard error): the app's requests say pid 0 and no unit; the
    # control's say its pid and the unit; the intruder's refusal names its uid.
    logs = pod.logs("keyd")
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and '"uid":' in line]
    app_lines = [line for line in lines if line.get("uid") == APP_UID and line.get("pid") == 0]
    assert {line.get("sub") for line in app_lines} >= {"alice", "bob", "carol"}, lines
    assert all(line["unit"] == "" for line in app_lines)
    assert any(line["uid"] == APP_UID and line["pid"] != 0 and line["unit"] == UNIT for line in lines), lines
    assert any(line["uid"] == INTRUDER_UID and line.get("outcome") != "issued" for line in lines), lines
    assert key not in logs
    assert "logged in to Vault with jwt auth" in logs


def test_node_agent_on_a_hostpath_serves_any_pod_of_the_granted_uid_and_refuses_others(
    podman: Podman,
    keyd_image: str,
    bao: BaoServer,
    root: hvac.Client,
    secret_path: tuple[str, str],
    workdir: Path,
) -> None:
    path, key = secret_path
    login = Login(root, workdir)
    node_dir = workdir / "node-run-keyd"  # as the kubelet's DirectoryOrCreate makes it: root, 0755
    node_dir.mkdir(mode=0o755)
    config = keyd_config(bao, login.mount, path, [{"uid": APP_UID, "types": ["user"]}])
    docs = node_agent_manifest(keyd_image, config, login.token_dir, node_dir)
    with played(podman, docs, workdir, NODE_POD, NODE_AGENT) as agent:
        wait_until(lambda: probe(agent, "readinessProbe") == 0, timeout=60, interval=0.5)
        assert probe(agent, "livenessProbe") == 0
        st = node_dir.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (KEYD_UID, 0o755), "the init container made it keyd's"

        def other_pod(uid: int, *argv: str, writable: bool = False) -> subprocess.CompletedProcess[str]:
            """A container of another pod on the node, mounting the hostPath as a client pod does."""
            volume = f"{node_dir}:/run/keyd" + ("" if writable else ":ro")
            return podman.run(
                "run", "--rm", "--user", f"{uid}:{uid}", "--read-only", "--cap-drop", "ALL", "--network", "none",
                "-v", volume, *argv, check=False,
            )  # fmt: skip

        done = other_pod(APP_UID, keyd_image, "token", "--user-id", "alice")
        assert done.returncode == 0, done.stderr
        assert jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])["sub"] == "alice"
        done = other_pod(INTRUDER_UID, keyd_image, "token", "--user-id", "alice")
        assert done.returncode == 1 and "forbidden, HTTP 403" in done.stderr, done.stderr
        done = other_pod(INTRUDER_UID, "--entrypoint", "python3", keyd_image, "-c", TAMPER, writable=True)
        tampering = json.loads(done.stdout)
        assert all(code in (errno.EACCES, errno.EPERM) for code in tampering.values()), tampering
        logs = agent.logs("keyd")
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and '"uid":' in line]
        assert any(line["uid"] == APP_UID and line["pid"] == 0 and line["unit"] == "" for line in lines), (
            lines
        )
        assert any(line["uid"] == INTRUDER_UID and line["code"] == "forbidden" for line in lines), lines
        assert key not in logs
