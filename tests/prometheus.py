"""A real Prometheus for the tests: Debian's ``prometheus`` package (prometheus and promtool), and a
server run from a config the test writes.

The binaries come from the package without installing it (no service, no user, no dependencies:
both are Go programs that need only libc): ``apt-get download prometheus``, unpacked with
``dpkg-deb -x`` into a cache (/var/cache/keyd-tests, or $KEYD_TEST_CACHE), reused by later runs.
A ``prometheus`` and ``promtool`` already on PATH are used as they are. Where none can be had, the
tests skip, saying why, except under CI (``CI`` set), where that is a failure: CI must run them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from keyd.ops.dev import free_port

CACHE = Path(os.environ.get("KEYD_TEST_CACHE", "/var/cache/keyd-tests"))
PACKAGE = "prometheus"


def unavailable(why: str) -> None:
    """Skip, or under CI fail: a CI run must not pass without these tests."""
    if os.environ.get("CI"):
        pytest.fail(f"Prometheus is needed in CI: {why}", pytrace=False)
    pytest.skip(f"Prometheus is not available: {why}")


def _cache_dir() -> Path:
    for base in (CACHE, Path.home() / ".cache" / "keyd-tests"):
        with contextlib.suppress(OSError):
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base / PACKAGE
    return Path(tempfile.gettempdir()) / f"keyd-tests-{os.getuid()}" / PACKAGE


def _unpacked(directory: Path) -> Path | None:
    """The usr/bin of an unpacked package in ``directory``, if both programs are there."""
    bin_dir = directory / "usr" / "bin"
    ok = all(os.access(bin_dir / name, os.X_OK) for name in ("prometheus", "promtool"))
    return bin_dir if ok else None


def _download(into: Path) -> tuple[Path | None, str]:
    """``apt-get download prometheus`` into ``into``, refreshing the package lists once (as root)."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return None, "no apt-get/dpkg-deb on this machine to fetch Debian's prometheus package"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done: subprocess.CompletedProcess[str] | None = None
    for attempt in (1, 2):
        done = subprocess.run(
            ["apt-get", "download", PACKAGE],
            cwd=into,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
        if done.returncode == 0 and debs:
            return debs[-1], ""
        if attempt == 1 and os.geteuid() == 0:  # no or stale package lists: refresh once
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600, check=False)
    stderr = done.stderr.strip()[-300:] if done is not None else ""
    return None, f"apt-get download {PACKAGE} failed: {stderr}"


def binaries() -> Path:
    """The directory holding ``prometheus`` and ``promtool`` (fetched and cached on first use)."""
    on_path = [shutil.which(name) for name in ("prometheus", "promtool")]
    if all(on_path) and Path(str(on_path[0])).parent == Path(str(on_path[1])).parent:
        return Path(str(on_path[0])).parent
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for unpacked in sorted(cache.glob("prometheus-*"), reverse=True):
            found = _unpacked(unpacked)
            if found is not None:
                return found
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            deb, why = _download(Path(scratch))
            if deb is None:
                unavailable(why)
                raise AssertionError("unreachable")  # unavailable() always raises
            version = deb.name.split("_")[1].replace(":", "-")
            building = cache / f".building-{version}"
            shutil.rmtree(building, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(building)], check=True, capture_output=True)
            target = cache / f"prometheus-{version}"
            shutil.rmtree(target, ignore_errors=True)
            building.rename(target)
        found = _unpacked(target)
        if found is None:
            unavailable(f"the {deb.name} package holds no usr/bin/prometheus and usr/bin/promtool")
            raise AssertionError("unreachable")
        return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries() / "promtool"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


class Prometheus:
    """``prometheus`` on a free loopback port with ``config`` (a dict written as JSON, which is YAML)
    and its rule files; TSDB in a temporary directory. ``query``/``query_range``/``alerts`` call
    its HTTP API."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.directory = directory
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(binaries() / "prometheus"),
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.console.templates=",
                    "--web.console.libraries=",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.logs()}")
            ready = f"{self.url}/-/ready"
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as answer:  # noqa: S310 - http://127.0.0.1
                if answer.status == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"prometheus did not become ready:\n{self.logs()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH?params: the ``data`` of a success; an AssertionError with Prometheus's
        own error text otherwise (a query that does not parse is a 400 with ``error``)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 - http://127.0.0.1
                doc = json.load(answer)
        except urllib.error.HTTPError as exc:
            doc = json.load(exc)
        if doc.get("status") != "success":
            raise AssertionError(f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing)."""
        return list(self.api("alerts")["alerts"])

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.alerts() if a["state"] == "firing"}
