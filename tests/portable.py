"""keyd for other users: tests that run keyd as another uid cannot point PYTHONPATH into the checkout.

A clone under /root or in a `mktemp -d` directory (0700), and the .venv inside it, cannot be
traversed by another user ("No module named keyd"). ``for_other_users()`` copies the keyd package
and the distributions it needs at run time (read from keyd's installed metadata, so nothing is
listed here by hand) into a fresh world-readable directory under /tmp, once per test session, and
finds a Python interpreter of the same version that the given user can execute.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Install:
    pythonpath: str  # the world-readable copy: keyd and its runtime dependencies

    def python(self, as_user: list[str]) -> str:
        """An interpreter that the user ``as_user`` (a setpriv prefix) can run and import keyd with."""
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        candidates = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", "")]
        candidates += [f"/usr/bin/python{version}", f"/usr/local/bin/python{version}", "/usr/bin/python3"]
        # keyd from the copy, not from a checkout the interpreter might find on its own.
        inner = (
            f"import sys, keyd.cli, keyd.daemon.wiring; assert sys.version_info[:2] == {sys.version_info[:2]}; "
            f"assert keyd.cli.__file__.startswith({self.pythonpath!r})"
        )
        # Re-executed once running as the user: setpriv keeps root's saved uid, with which the first
        # exec may still reach an interpreter under /root that the user's own exec cannot.
        probe = f"import os, sys; os.execv(sys.executable, [sys.executable, '-c', {inner!r}])"
        env = {"PYTHONPATH": self.pythonpath, "PATH": "/usr/bin:/bin"}
        for candidate in dict.fromkeys(c for c in candidates if c):
            done = subprocess.run(
                [*as_user, candidate, "-c", probe], capture_output=True, cwd="/", env=env, check=False
            )
            if done.returncode == 0:
                return candidate
        raise AssertionError(
            f"no Python {version} that this user can run was found (tried {', '.join(candidates)}); "
            f"install python{version} system-wide (e.g. apt-get install python3)"
        )


def _requirements(name: str) -> set[str]:
    """The distributions ``name`` needs at run time, itself included (environment markers applied)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        key = re.sub(r"[-_.]+", "-", current).lower()
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.requires(current) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


@functools.cache
def for_other_users() -> Install:
    target = Path(tempfile.mkdtemp(prefix="keyd-py-", dir="/tmp"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    shutil.copytree(ROOT / "keyd", target / "keyd", ignore=shutil.ignore_patterns("__pycache__"))
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    platlib = Path(sysconfig.get_paths()["platlib"]).resolve()
    for name in _requirements("keyd") - {"keyd"}:
        for file in metadata.distribution(name).files or []:
            source = Path(str(file.locate())).resolve()
            for base in (purelib, platlib):
                if source.is_relative_to(base) and source.is_file() and "__pycache__" not in source.parts:
                    destination = target / source.relative_to(base)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, destination)
                    break
    for directory, _, files in os.walk(target):
        os.chmod(directory, 0o755)  # noqa: S103 - other users must read it; nothing secret in it
        for file_name in files:
            os.chmod(os.path.join(directory, file_name), 0o644)
    return Install(pythonpath=str(target))
