"""A caller with no ``rest`` grant cannot make keyd buffer REST-sized bodies (review, attack 1).

The REST proxy has a body limit of its own (``apps.NAME.rest.max_body``, 1 MiB by default, against
16 KiB for keyd's own endpoints), and the socket layer applied it to every request under
``/v1/rest/`` before anything was authorized. So any local user allowed to open the socket, with no
grant at all, could make keyd hold a 1 MiB body per connection it opens: 64 connections grew keyd's
RSS by more than 60 MiB, 1024 (``max_connections``) by a GiB. Now the larger limit applies only to a
caller whose grant has the type ``rest``; anyone else gets keyd's own limit (413 early) and the 403
the proxy answers to a small body.

Runs against a real keyd on a real OpenBao. The attacker is this process, whose uid no grant names;
the one ``rest`` grant names another uid (nothing is ever sent upstream).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tests.conftest import base_config
from tests.helpers import wait_until

CONNECTIONS = 64
BODY = 1_000_000  # under rest.max_body (1 MiB): accepted as a REST body before the fix


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _config(bao: Any, short_dir: Path, path: str) -> dict[str, Any]:
    config = base_config(bao, short_dir, path)
    config["server"]["max_connections"] = 1024
    # This attack is about the body limit: without the grantless cap (8), which would refuse most
    # of these connections before any body is read (tests/adversarial/test_grantless_flood.py).
    config["server"]["max_connections_without_grant"] = 1024
    other = os.getuid() + 1 if os.getuid() != 0 else 65534
    config["grant"] = [{"uid": other, "types": ["user", "rest"], "rest": ["PUT /users/*"]}]
    return config


def _head(length: int) -> bytes:
    return (
        b"PUT /v1/rest/default/users/victim HTTP/1.1\r\nHost: keyd\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


def test_a_caller_without_a_rest_grant_cannot_make_keyd_buffer_rest_bodies(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, keyd_factory: Any
) -> None:
    keyd = keyd_factory(_config(bao, short_dir, secret_path[0]))
    # Positive control: a small body is read and refused by the grant check (403), not the size.
    small = b'{"name":"x"}'
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(keyd.socket)
        sock.sendall(_head(len(small)) + small)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "forbidden"

    before = _rss(keyd.pid)
    chunk = b"x" * 65536
    held: list[socket.socket] = []
    answers: list[bytes] = []
    try:
        for _ in range(CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(keyd.socket)
            held.append(sock)
            sock.sendall(_head(BODY))
            sent = 0
            try:
                while sent < BODY - 1:  # all but the last byte: keyd keeps waiting for it
                    piece = chunk[: BODY - 1 - sent]
                    sock.sendall(piece)
                    sent += len(piece)
            except OSError:  # keyd answered 413 and stopped reading: nothing more to send
                pass
        time.sleep(0.5)
        wait_until(lambda: _rss(keyd.pid) >= 0, timeout=1)
        grown = _rss(keyd.pid) - before
        for sock in held[:4]:
            sock.settimeout(5)
            try:
                answers.append(sock.recv(65536))
            except OSError as exc:
                answers.append(repr(exc).encode())
    finally:
        for sock in held:
            sock.close()
    assert grown < 16 << 20, f"keyd's RSS grew by {grown >> 20} MiB for a caller with no rest grant"
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"16384" in answer
    # keyd still serves.
    status, _ = keyd.http().get_json("/v1/health")
    assert status == 200
