"""Podman for the image and pod tests, as it works on these machines.

Installed with apt-get when missing (with runc, and catatonit for the pods' pause image). Every
call goes through a containers.conf of the test run's own: runtime runc (the hybrid cgroup layout
makes crun refuse) and default ulimits within the host's hard limits (podman's own defaults exceed
them and runc then fails to start anything). There is no image registry here: the base image is a
Debian 12 root file system made by debootstrap, cached like the systemd tests' tree
(tests/systemd/machine.py's ``rootfs``), and imported once with ``podman import``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from tests.systemd.machine import PATH, cache_lock, require_tools, rootfs

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"podman": "podman", "runc": "runc", "catatonit": "catatonit", "debootstrap": "debootstrap"}
# What the Containerfile's base needs: Debian's python3 and venv (the build stage makes keyd's
# virtualenv with it), and the CA bundle for https Vault addresses.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_REPOSITORY = "localhost/keyd-test-base"


def require_podman() -> None:
    """Root, podman, runc, catatonit and debootstrap, installed with apt-get when missing."""
    require_tools(TOOLS, why="builds a base image with debootstrap and runs pods with podman")


def ulimit() -> int:
    """The largest nofile/nproc every container may have: the host's smaller hard limit, at most
    20000 (higher nproc values, though below the hard limit, were refused by runc here)."""
    limits = [resource.getrlimit(which)[1] for which in (resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC)]
    return min([20000, *[value for value in limits if value != resource.RLIM_INFINITY]])


class Podman:
    """``podman`` with this test run's containers.conf (in ``workdir``)."""

    def __init__(self, workdir: Path) -> None:
        limit = ulimit()
        self.conf = workdir / "containers.conf"
        self.conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={limit}:{limit}", "nproc={limit}:{limit}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *argv],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done

    def dangling(self) -> list[str]:
        """Ids of untagged images (a multi-stage build leaves its build stage so)."""
        return self.run("images", "--filter", "dangling=true", "--quiet", "--no-trunc").stdout.split()

    def base_image(self) -> str:
        """Debian 12 with BASE_PACKAGES as an image, imported from the cached tree on first use."""
        tree = rootfs(BASE_PACKAGES, name="oci-base")
        name = f"{BASE_REPOSITORY}:{tree.name.rsplit('-', 1)[-1]}"
        with cache_lock():
            if self.run("image", "exists", name, check=False).returncode == 0:
                return name
            tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
            done = subprocess.run(
                ["podman", "import", "--change", f"ENV=PATH={PATH}", "-", name],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=300,
                check=False,
            )
            tar.wait()
            assert done.returncode == 0 and tar.returncode == 0, done.stderr[-3000:]
            listed = self.run("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY).stdout
            for stale in listed.split():  # bases imported from older trees
                if stale != name:
                    self.run("rmi", "--force", stale, check=False)
            return name

    def build_keyd(self, base: str, tag: str) -> str:
        """`make image`'s script with the test virtualenv's pip, on ``base``; returns the image."""
        pip = Path(sys.executable).parent / "pip"
        done = subprocess.run(
            ["sh", str(ROOT / "packaging" / "container" / "build-image.sh"), str(pip)],
            capture_output=True,
            text=True,
            env={**self.env, "IMAGE": tag, "BASE": base, "ENGINE": "podman"},
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-5000:]
        return done.stdout.strip().splitlines()[-1]
