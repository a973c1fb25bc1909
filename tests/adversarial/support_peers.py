"""Helpers for the peer-identity attacks: real cgroups shaped like systemd's, clients run as other
uids (setpriv) placed in them, kept-alive connections driven line by line.

Cgroups are created at the root of every hierarchy systemd could use for process tracking (each
mounted cgroup2 hierarchy and the v1 ``name=systemd`` one), with unique leaf names, and removed
afterwards (only the directories this module created).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.sysusers import CLIENT, SysUsers

# Run as root: join the given cgroups, check the kernel shows the expected path, then exec the rest.
PLACE = r"""
import os, sys
procs, expected = sys.argv[1].split(":"), sys.argv[2]
for path in procs:
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
with open("/proc/self/cgroup") as handle:
    text = handle.read()
if not any(line.split(":", 2)[2] == expected for line in text.splitlines() if line.count(":") >= 2):
    print(text, file=sys.stderr)
    sys.exit(3)
os.execvp(sys.argv[3], sys.argv[3:])
"""

# One connection kept alive; one JSON request body per stdin line, one [status, body] line out.
KEEPALIVE = r"""
import http.client, json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(20)
sock.connect(sys.argv[1])
conn = http.client.HTTPConnection("keyd")
conn.sock = sock
for line in sys.stdin:
    conn.request("POST", "/v1/tokens", body=line.strip(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    print(json.dumps([response.status, json.loads(response.read())]), flush=True)
"""

# 500 forked processes, one request each, one after the other: [statuses], seconds taken.
FORKS = r"""
import json, os, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
body = b'{"user_id":"u1"}'
request = (
    b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
)
statuses = []
started = time.monotonic()
for _ in range(count):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        status = b"000"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(request)
            status = sock.recv(64)[9:12]
        finally:
            os.write(write, status)
            os._exit(0)
    os.close(write)
    statuses.append(int(os.read(read, 3) or b"0"))
    os.close(read)
    os.waitpid(pid, 0)
print(json.dumps({"statuses": statuses, "seconds": time.monotonic() - started}))
"""


def systemd_hierarchies() -> list[Path]:
    """Mount points of the hierarchies systemd tracks processes in: cgroup2 and v1 name=systemd."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue
        if tail[0] == "cgroup2" or (tail[0] == "cgroup" and "name=systemd" in tail[2].split(",")):
            found.append(Path(fields[4]))
    return found


@dataclass
class Cgroups:
    """Cgroups at ``relative`` paths under every systemd hierarchy; ``cleanup`` removes them."""

    created: list[Path] = field(default_factory=list)
    roots: list[Path] = field(default_factory=systemd_hierarchies)

    def make(self, relative: str) -> list[str]:
        """The cgroup.procs files of ``relative`` in every hierarchy (created as needed)."""
        if not self.roots:
            pytest.skip("no cgroup2 or name=systemd hierarchy is mounted")
        procs = []
        for root in self.roots:
            path = root
            for part in relative.strip("/").split("/"):
                path = path / part
                if not path.exists():
                    try:
                        path.mkdir()
                    except OSError as exc:
                        pytest.skip(f"cannot create cgroup {path}: {exc.strerror}")
                    self.created.append(path)
            procs.append(str(path / "cgroup.procs"))
        return procs

    def cleanup(self) -> None:
        for path in reversed(self.created):
            try:
                path.rmdir()
            except OSError:
                continue


def client_in_cgroup(
    users: SysUsers, cgroups: Cgroups, relative: str, user: str, socket_path: str, requests: list[Any]
) -> dict[str, Any]:
    """Run sysusers' CLIENT as ``user`` from inside the cgroup ``relative`` (placed there as root)."""
    procs = cgroups.make(relative)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PLACE,
            ":".join(procs),
            "/" + relative.strip("/"),
            *users.as_user(user),
            users.python(user),
            "-c",
            CLIENT,
            socket_path,
            json.dumps(requests),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"a process placed in {relative} is not shown there by /proc: {done.stderr}")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class KeptAlive:
    """A client process (another uid) holding one keyd connection; ``ask`` sends one request."""

    def __init__(self, command: list[str], socket_path: str) -> None:
        self.process = subprocess.Popen(
            [*command, "-c", KEEPALIVE, socket_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ask(self, payload: dict[str, Any]) -> tuple[int, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(payload) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read() if self.process.stderr else "client ended"
        status, body = json.loads(line)
        return int(status), body

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def groups_of(pid: int) -> set[int]:
    """The supplementary groups a live process has (its kernel credentials)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()
