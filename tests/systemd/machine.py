"""A Debian 12 system booted with systemd as PID 1 (systemd-nspawn), for testing keyd's package.

The root file system is built once by debootstrap and cached under /var/cache/keyd-tests/ (or
$KEYD_TEST_CACHE), keyed by what goes into it; each boot mounts it read-only under a tmpfs overlay
(``--volatile=overlay``), so every container starts from the same pristine tree and leaves nothing
behind. The container shares the host's network: a Vault on 127.0.0.1 is reachable from inside.
Commands run inside with ``nsenter`` into all of the container's namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SUITE = "bookworm"
MIRROR = os.environ.get("KEYD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# A minimal Debian server with systemd; the package's dependencies (procps) and logrotate (its
# snippet is tested) are in the cached tree, so installing the .deb downloads nothing.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "logrotate", "procps")
CACHE = Path(os.environ.get("KEYD_TEST_CACHE", "/var/cache/keyd-tests"))
TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux"}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_tools(
    tools: dict[str, str] = TOOLS,
    why: str = "builds a Debian rootfs with debootstrap and boots it with systemd-nspawn",
) -> None:
    """Root, and ``tools`` (command -> Debian package; installed with apt-get when missing)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
            done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot install {', '.join(missing)}: {done.stderr.strip()[-500:]}")
    still = [tool for tool in tools if shutil.which(tool) is None]
    if still:
        pytest.skip(f"cannot install {', '.join(still)} (no apt-get?)")


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """The cache's exclusive lock (builds of cached trees and images, by every test run here)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs(packages: tuple[str, ...] = PACKAGES, name: str = "rootfs") -> Path:
    """The cached Debian rootfs with ``packages``, built on first use (about a minute) under an
    exclusive lock. ``name`` keeps trees of different purposes apart (each keeps only its newest)."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "debootstrap"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(repr((SUITE, MIRROR, packages, version, 1)).encode()).hexdigest()[:16]
    target = CACHE / f"{name}-{SUITE}-{key}"
    with cache_lock():
        if (target / "etc" / "os-release").exists():
            return target
        building = CACHE / f".building-{name}-{key}"
        shutil.rmtree(building, ignore_errors=True)
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            SUITE,
            str(building),
            MIRROR,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
        if done.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        for cached in (building / "var/cache/apt/archives").glob("*.deb"):
            cached.unlink()
        building.rename(target)
        for stale in CACHE.glob(f"{name}-{SUITE}-*"):  # trees built from other inputs (~300 MB each)
            if stale != target:
                shutil.rmtree(stale, ignore_errors=True)
        return target


class Machine:
    """One booted container. ``run`` executes a command inside (as root, or as ``user``)."""

    def __init__(self, root: Path, workdir: Path, binds: dict[str, str] | None = None) -> None:
        self.root = root
        self.workdir = workdir
        self.binds = binds or {}
        self.console = workdir / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 90.0) -> Machine:
        command = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--boot",
        ]
        command += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.console, "wb") as console:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-nspawn did not start:\n{self.console.read_text()[-3000:]}")
            self.leader = self._find_leader(self.process.pid)
            time.sleep(0.05)
        while True:  # systemctl fails to connect until systemd has set up its private socket
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            if state.stdout.strip() in ("running", "degraded"):
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot: {state.stdout} {state.stderr}")
            time.sleep(0.2)

    @staticmethod
    def _find_leader(nspawn: int) -> int:
        """The container's PID 1, a child of systemd-nspawn (pid 1 in its own pid namespace)."""
        try:
            children = [
                int(pid)
                for task in Path(f"/proc/{nspawn}/task").iterdir()
                for pid in (task / "children").read_text().split()
            ]
        except OSError:
            return 0
        for pid in children:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                if nspid.split()[-1] == "1" and len(nspid.split()) > 2:
                    return pid
        return 0

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        """The host command line that runs ``argv`` inside the container."""
        prefix = ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--"]
        prefix += ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8"]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--reset-env"]
        return [*prefix, *argv]

    def run(
        self,
        *argv: str,
        user: str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*argv, user=user),
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kwargs)  # type: ignore[arg-type]  # kwargs are run()'s

    def path(self, inside: str) -> Path:
        """A path inside the container, as the host (root) reaches it."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        path = self.path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, mode)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def wait_for(self, what: str, predicate: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]  # any callable returning a truth value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Power the container off (SIGTERM to systemd-nspawn), killing it if that takes too long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        if self.leader:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{self.leader}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
