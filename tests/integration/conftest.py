"""The language runtimes the client and example tests run (Node.js, npm, PHP, composer).

A missing runtime is installed from Debian's packages when the tests run as root; a test skips,
saying why, only where that is impossible (not root, no apt-get, the install failed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest


def _apt_install(*packages: str) -> str:
    """Install Debian packages; returns "" or why it could not."""
    if os.geteuid() != 0:
        return "not root, so cannot apt-get install " + " ".join(packages)
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    for attempt in (1, 2):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
        if done.returncode == 0:
            return ""
        if attempt == 1:  # stale package lists: refresh once and retry
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600, check=False)
    return f"apt-get install {' '.join(packages)} failed: {done.stderr.strip()[-300:]}"


def runtime(check: Callable[[], bool], packages: tuple[str, ...], what: str) -> None:
    """Make ``check()`` true by installing ``packages``, or skip the test saying why it cannot be."""
    if check():
        return
    why = _apt_install(*packages)
    if not check():
        pytest.skip(f"{what} is not available: {why or 'installed, but still not usable'}")


def _php_ok() -> bool:
    if not shutil.which("php"):
        return False
    done = subprocess.run(["php", "-m"], capture_output=True, text=True, check=False)
    return "curl" in done.stdout.split()


@pytest.fixture(scope="session")
def php() -> str:
    runtime(_php_ok, ("php-cli", "php-curl"), "PHP with the curl extension")
    return "php"


@pytest.fixture(scope="session")
def composer(php: str) -> str:
    runtime(lambda: shutil.which("composer") is not None, ("composer",), "composer")
    return "composer"


@pytest.fixture(scope="session")
def node() -> str:
    runtime(lambda: shutil.which("node") is not None, ("nodejs",), "Node.js")
    return "node"


@pytest.fixture(scope="session")
def npm(node: str) -> str:
    runtime(lambda: shutil.which("npm") is not None, ("npm",), "npm")
    return "npm"
