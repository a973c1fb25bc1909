"""Local attacks on keyd's socket server, run for real against a keyd process: one uid hogging
connections, connections held without a request, a refusal flood into the audit log, and a stop
under continuous keep-alive load.

The attackers are real other uids (setpriv; root only, skipped otherwise with the reason); the stop
test runs as the current user.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.support_server import Hog, flood, open_config, token_request
from tests.conftest import base_config
from tests.helpers import Eof, read_response, wait_until
from tests.integration.sysusers import SysUsers

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs attackers as other uids")



@pytest.fixture(scope="module")
def accounts(users: SysUsers) -> dict[str, Any]:
    group = users.group("lim")
    return {
        "app": users.user("app", primary=group),  # the one caller with a grant
        "hog": users.user("hog", primary=group),  # no grant: holds connections
        "flood": users.user("flood", primary=group),  # no grant: floods refusals
    }


def _ask(users: SysUsers, user: str, socket_path: str) -> list[Any]:
    result = users.client(user, socket_path, [("POST", "/v1/tokens", {"user_id": "alice"})])
    assert "connect_error" not in result, result
    return list(result["results"][0])


# -- one uid holding every connection ----------------------------------------------------------


@needs_root
def test_one_uid_cannot_hold_every_connection(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers, accounts: Any
) -> None:
    """The attack: a user with no grant opens max_connections connections and holds them; before
    the fix every other caller got 503 too_many_connections. Now it gets its per-uid share and
    another uid is still served."""
    path, _ = secret_path
    config = open_config(bao, short_dir, path, granted=accounts["app"].pw_name)
    config["server"].update(max_connections=24, max_connections_per_uid=8, first_byte_timeout="60s")
    keyd = keyd_factory(config)
    hog = Hog(users, accounts["hog"].pw_name, keyd.socket, count=24, settle=1.5)
    try:
        assert hog.report["connected"] == 24
        assert hog.report["held"] == 8, hog.report
        assert hog.report["refused_codes"] == ["too_many_connections"] * 16, hog.report
        # While the hog holds all it can, another uid is served (the attack's victim).
        status, doc = _ask(users, accounts["app"].pw_name, keyd.socket)
        assert status == 200, doc
        # Positive control: the hog's uid is still refused a ninth connection, not served.
        ninth = Hog(users, accounts["hog"].pw_name, keyd.socket, count=1, settle=0.5)
        ninth.release()
        assert ninth.report["refused_codes"] == ["too_many_connections"], ninth.report
    finally:
        hog.release()
    # Its connections gone, the hog's uid may connect again (the count follows the connections).
    wait_until(lambda: _ask(users, accounts["hog"].pw_name, keyd.socket)[0] == 403, 10, what="slots released")


@needs_root
def test_a_connection_without_a_request_is_closed_soon(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers, accounts: Any
) -> None:
    """Connections held without sending a byte are closed after first_byte_timeout (before the
    fix: after idle_timeout, a minute). A connection that sent a request is kept alive."""
    path, _ = secret_path
    config = open_config(bao, short_dir, path, granted=accounts["app"].pw_name)
    config["server"].update(max_connections_per_uid=8, first_byte_timeout="2s", idle_timeout="60s")
    keyd = keyd_factory(config)
    # Positive control first: a keep-alive connection that sent a request stays open past 2 s.
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.settimeout(10)
    control.connect(keyd.socket)
    control.sendall(token_request("early"))
    assert read_response(control)[0] == 403  # root has no grant here: an answer all the same
    hog = Hog(users, accounts["hog"].pw_name, keyd.socket, count=8, settle=0.3, watch=4.0)
    try:
        assert hog.report["held"] == 8, hog.report
        assert hog.report["closed_after_watch"] == 8, hog.report
    finally:
        hog.release()
    control.sendall(token_request("late"))
    assert read_response(control)[0] == 403, "a connection that made a request is kept alive"
    control.close()


# -- a refusal flood into the audit log --------------------------------------------------------


def _audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_root
def test_a_refusal_flood_cannot_fill_the_disk(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers, accounts: Any
) -> None:
    """20,000 refused requests with 256-character user ids from one uid, pipelined: before the fix
    about 30 MB of audit lines; now at most 2 MiB, with counted summary lines whose counts add
    up, while every issued token still has its own line."""
    path, _ = secret_path
    audit = short_dir / "audit.log"
    config = open_config(bao, short_dir, path, granted=accounts["app"].pw_name)
    config["audit"] = {"file": str(audit), "refusal_summary_every": "1s"}
    keyd = keyd_factory(config)
    flooder = accounts["flood"]
    issued_before = _ask(users, accounts["app"].pw_name, keyd.socket)
    assert issued_before[0] == 200
    wait_until(lambda: audit.exists() and audit.stat().st_size > 0, 5, what="the first audit line")
    size_before = audit.stat().st_size

    result = flood(users, flooder.pw_name, keyd.socket, 20_000)
    assert result["statuses"] == {"403": 20_000}, result
    assert result["codes"] == {"forbidden": 20_000}, result
    issued_after = _ask(users, accounts["app"].pw_name, keyd.socket)
    assert issued_after[0] == 200

    def counted() -> int:
        mine = [line for line in _audit_lines(audit) if line.get("uid") == flooder.pw_uid]
        return sum(1 for line in mine if line["outcome"] == "refused") + sum(  # type: ignore[no-any-return]  # JSON numbers
            line.get("folded", 0) for line in mine if line["outcome"] == "refused_folded"
        )

    wait_until(lambda: counted() >= 20_000, 15, what="the summary lines of the flood")
    growth = audit.stat().st_size - size_before
    print(f"audit growth for 20,000 refused requests from one uid: {growth:,} bytes")
    assert growth <= 2 * 1024 * 1024, growth
    assert counted() == 20_000, "every refusal is a line or counted in exactly one summary"
    lines = _audit_lines(audit)
    mine = [line for line in lines if line.get("uid") == flooder.pw_uid]
    summaries = [line for line in mine if line["outcome"] == "refused_folded"]
    assert summaries and all(line["code"] == "forbidden" for line in summaries)
    assert all(line["user"] == flooder.pw_name for line in summaries)
    refused = [line for line in mine if line["outcome"] == "refused"]
    assert all(len(line["sub"]) <= 64 and line["sub_chars"] == 256 for line in refused)
    issued = [line for line in lines if line["outcome"] == "issued"]
    assert [line["uid"] for line in issued] == [accounts["app"].pw_uid] * 2


# -- a stop under continuous keep-alive load ---------------------------------------------------


class Client(threading.Thread):
    """Token requests on a keep-alive connection, one after another, each outcome timed."""

    def __init__(self, path: str, index: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.index = index
        self.outcomes: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        sock: socket.socket | None = None
        while not self.halt.is_set():
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                try:
                    sock.connect(self.path)
                except OSError:
                    return  # the socket is gone: keyd stopped taking connections
            try:
                sock.sendall(token_request(f"c{self.index}"))
            except OSError:
                sock.close()  # not sent: nothing was in flight
                sock = None
                continue
            sent = time.time()
            try:
                status, headers, _, _ = read_response(sock)
                outcome = f"{status} close" if headers.get(b"connection") == b"close" else str(status)
            except Eof as exc:
                outcome = "eof after a partial answer" if exc.truncated else "eof"
            except ConnectionResetError:
                outcome = "reset"
            except OSError as exc:
                outcome = f"error {exc.errno}"
            self.outcomes.append((sent, outcome))
            if outcome != "200":
                sock.close()
                sock = None


def test_a_stop_resets_no_request_that_was_sent_in_time(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    """SIGTERM while 16 clients send token requests back to back on keep-alive connections.

    A request fully sent before keyd began to stop (its "shutting down" log line) gets its answer,
    with "Connection: close" once the stop began; no client sees a reset or an EOF instead of it.
    A request sent later may find the connection closed (an EOF, never a reset): the client
    retries on a fresh connection, as README says.
    """
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["log"] = {"format": "json"}
    keyd = keyd_factory(config)
    idle = []  # keep-alive connections that made one request and then wait
    for i in range(4):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(keyd.socket)
        sock.sendall(token_request(f"idle{i}"))
        assert read_response(sock)[0] == 200
        idle.append(sock)
    clients = [Client(keyd.socket, i) for i in range(16)]
    for client in clients:
        client.start()
    wait_until(lambda: all(len(c.outcomes) >= 20 for c in clients), 20, what="load on every client")
    keyd.signal(signal.SIGTERM)
    assert keyd.process is not None
    code = keyd.process.wait(20)
    for client in clients:
        client.halt.set()
        client.join(15)
    began = _stop_began(keyd.logs())
    outcomes = [outcome for client in clients for outcome in client.outcomes]
    in_time = Counter(outcome for sent, outcome in outcomes if sent < began)
    later = Counter(outcome for sent, outcome in outcomes if sent >= began)
    print(f"sent before the stop: {dict(in_time)}; after: {dict(later)}")
    assert code == 0, keyd.logs()
    assert set(in_time) <= {"200", "200 close"}, in_time
    assert set(later) <= {"200", "200 close", "eof"}, later
    assert "reset" not in later
    for sock in idle:  # idle through the drain window: an EOF, not a reset
        assert sock.recv(65536) == b""
        sock.close()


def _stop_began(logs: str) -> float:
    """The time of keyd's "shutting down" line (a lower bound of when it began to stop)."""
    for line in logs.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("message") == "shutting down":
                return datetime.fromisoformat(doc["time"]).timestamp()
    raise AssertionError(f"no 'shutting down' line:\n{logs}")
