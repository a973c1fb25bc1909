"""Real users and groups for tests that need other uids (root only), and a client run as them.

Each name is unique per run and everything created is deleted afterwards. Clients run with
``setpriv --reuid --regid --init-groups``, executing a small stdlib-only Python script.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

NEEDS = ("setpriv", "useradd", "userdel", "groupadd", "groupdel")

CLIENT = r"""
import http.client, json, os, socket, sys
path, requests = sys.argv[1], json.loads(sys.argv[2])
out = {"pid": os.getpid(), "results": []}
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
except OSError as exc:
    out["connect_error"] = exc.errno
    print(json.dumps(out))
    sys.exit(0)
conn = http.client.HTTPConnection("keyd")
conn.sock = sock
for method, url, payload in requests:
    body = None if payload is None else json.dumps(payload)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, url, body=body, headers=headers)
    response = conn.getresponse()
    out["results"].append([response.status, json.loads(response.read())])
print(json.dumps(out))
"""


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates users and groups and runs clients as them with setpriv")
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (util-linux, passwd)")


@dataclass
class SysUsers:
    """Creates users and groups with unique names; ``cleanup`` removes them."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    users: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    _python: str | None = None

    def name(self, base: str) -> str:
        return f"kd{self.tag}{base}"[:31]

    def group(self, base: str) -> str:
        name = self.name(base)
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self.groups.append(name)
        return name

    def user(self, base: str, primary: str, extra: tuple[str, ...] = ()) -> pwd.struct_passwd:
        name = self.name(base)
        cmd = ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", primary]
        if extra:
            cmd += ["-G", ",".join(extra)]
        subprocess.run([*cmd, name], check=True, capture_output=True)
        self.users.append(name)
        return pwd.getpwnam(name)

    def cleanup(self) -> None:
        for name in self.users:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], check=False, capture_output=True)

    def as_user(self, user: str) -> list[str]:
        return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups"]

    def python(self, user: str) -> str:
        """A Python interpreter this user can execute (the venv's may sit under /root, 0700)."""
        if self._python is None:
            for candidate in (sys.executable, "/usr/bin/python3"):
                probe = subprocess.run(
                    [*self.as_user(user), candidate, "-c", "import http.client, json"],
                    capture_output=True,
                    check=False,
                )
                if probe.returncode == 0:
                    self._python = candidate
                    break
            else:
                pytest.skip("no Python interpreter is executable by an unprivileged test user")
        assert self._python is not None
        return self._python

    def client(self, user: str, socket_path: str, requests: list[tuple[str, str, Any]]) -> dict[str, Any]:
        """Run CLIENT as `user`: one connection, the given requests; returns pid and results."""
        done = subprocess.run(
            [*self.as_user(user), self.python(user), "-c", CLIENT, socket_path, json.dumps(requests)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@contextmanager
def sysusers() -> Iterator[SysUsers]:
    require_root()
    users = SysUsers()
    try:
        yield users
    finally:
        users.cleanup()
