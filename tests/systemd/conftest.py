"""Fixtures for the systemd suite: the Debian package built from this checkout, a Debian 12 system
booted with systemd as PID 1 with the package installed, and an OpenBao on the host that the
container reaches on 127.0.0.1, prepared by `keyd vault setup` with the shipped operator policy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyd.ops.dev import BaoServer
from tests.conftest import new_key
from tests.systemd.machine import Machine, require_tools, rootfs

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_POLICY = ROOT / "deploy" / "vault" / "operator-policy.hcl"
DEB_DIR = "/mnt/keyd-deb"  # inside the container


def build_deb(outdir: Path) -> Path:
    """`make deb`'s build script, with the test's virtualenv's pip; returns the .deb."""
    pip = Path(sys.executable).parent / "pip"
    done = subprocess.run(
        ["sh", str(ROOT / "packaging" / "debian" / "build-deb.sh"), str(outdir), str(pip)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def newer_revision(deb: Path, revision: str) -> Path:
    """The same files as a newer Debian revision, for the upgrade test."""
    unpacked = deb.parent / "unpacked"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    control = unpacked / "DEBIAN" / "control"
    version = next(line for line in control.read_text().splitlines() if line.startswith("Version:"))
    upstream = version.split()[1].rsplit("-", 1)[0]
    control.write_text(control.read_text().replace(version, f"Version: {upstream}-{revision}"))
    newer = deb.parent / f"keyd_{upstream}-{revision}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(unpacked), str(newer)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(unpacked)
    return newer


@pytest.fixture(scope="session")
def debs() -> Iterator[tuple[Path, Path]]:
    """(the package, the same package as a newer revision), in a directory the container sees."""
    require_tools()
    outdir = Path(tempfile.mkdtemp(prefix="keyd-deb-"))
    try:
        deb = build_deb(outdir)
        yield deb, newer_revision(deb, "99")
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


@pytest.fixture(scope="session")
def debian() -> Path:
    require_tools()
    return rootfs()


@pytest.fixture(scope="session")
def vault() -> Iterator[BaoServer]:
    """An OpenBao of this suite's own (its AppRole mount, roles and policies are the shipped names)."""
    with BaoServer() as server:
        yield server


@dataclass
class Operator:
    token: str  # holds exactly deploy/vault/operator-policy.hcl, no default policy
    key: str  # the TalkJS key first stored


@pytest.fixture(scope="session")
def operator(vault: BaoServer) -> Operator:
    root = vault.client()
    root.sys.create_or_update_policy("keyd-operator", OPERATOR_POLICY.read_text())
    token = root.auth.token.create(policies=["keyd-operator"], no_default_policy=True, ttl="2h")
    return Operator(token=token["auth"]["client_token"], key=new_key())


def keyd_config(vault: BaoServer) -> str:
    """/etc/keyd/config.toml as an operator would write it for this host."""
    return f"""\
[vault]
address = "{vault.address}"
timeout = "2s"

[vault.auth]
method = "approle"
role_id_file = "${{CREDENTIALS_DIRECTORY}}/role-id"
secret_id_file = "${{CREDENTIALS_DIRECTORY}}/secret-id"

[refresh]
interval = "5m"
retry_min = "0.2s"
retry_max = "1s"

[apps.default]
app_id = "tTestApp"
path = "talkjs/live"

[[grant]]                          # the README's: a sync job may use the REST API
unit = "talkjs-sync.service"
types = ["app"]

[[grant]]                          # whoever may open the socket: user tokens
group = "keyd-clients"
types = ["user"]

[audit]
file = "/var/log/keyd/audit.log"
"""


@pytest.fixture(scope="module")
def machine(debian: Path, debs: tuple[Path, Path], vault: BaoServer) -> Iterator[Machine]:
    """A booted Debian 12 with the package installed (nothing configured or started yet), and the
    users the tests need: webapp (in keyd-clients), talksync (in keyd-clients), outsider."""
    deb, _ = debs
    workdir = Path(tempfile.mkdtemp(prefix="keyd-nspawn-"))
    box = Machine(debian, workdir, binds={str(deb.parent): DEB_DIR})
    try:
        box.boot()
        box.run("apt-get", "install", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb.name}", timeout=120)
        box.sh(
            "useradd -m -U -G keyd-clients webapp; useradd -m -U -G keyd-clients talksync;"
            " useradd -m -U outsider"
        )
        yield box
    finally:
        box.stop()
        shutil.rmtree(workdir, ignore_errors=True)
