"""keyd.systemd: sd_notify datagrams, the watchdog interval, socket activation (fd 3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyd import config as configuration
from keyd.daemon import systemd
from keyd.daemon.keys.keystore import KeySnapshot, SecretKey
from keyd.daemon.wiring import Daemon


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_notifier_sends_newline_joined_lines_to_a_path(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with receiver(path) as sock:
        notifier = systemd.Notifier(path)
        assert notifier.enabled
        notifier.notify("READY=1", "STATUS=serving 1 app(s)")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving 1 app(s)"
        notifier.close()
        assert not notifier.enabled
        notifier.notify("STOPPING=1")  # after close: a silent no-op


def test_notifier_supports_abstract_addresses() -> None:
    name = f"keyd-test-{os.getpid()}-{os.urandom(4).hex()}"
    with receiver("\0" + name) as sock:
        systemd.Notifier("@" + name).notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notifier_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd.Notifier()
    assert not notifier.enabled
    notifier.notify("READY=1")  # must not raise


def test_notifier_survives_a_vanished_socket(short_dir: Path) -> None:
    notifier = systemd.Notifier(str(short_dir / "gone"))
    notifier.notify("READY=1")  # ENOENT is logged at debug level, never raised
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # half of WatchdogSec=30s
        ("30000000", "self", 15.0),
        ("30000000", "1", None),  # meant for another process
        ("0", None, None),
        ("", None, None),
        ("abc", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec, pid, expected) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


def test_listen_socket_ignores_variables_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDNAMES", "keyd.socket")
    assert systemd.listen_socket() is None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        assert name not in os.environ, "LISTEN_* must not leak into child processes"


def test_listen_socket_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert systemd.listen_socket() is None


# fd 3 belongs to whoever holds it in the test process, so the fd-3 cases run in a child process.
CHILD = textwrap.dedent(
    """
    import os, socket, sys
    from keyd.daemon import systemd
    kind = sys.argv[1]
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sys.argv[2]); s.listen()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    os.dup2(s.fileno(), 3)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    try:
        got = systemd.listen_socket()
    except OSError as exc:
        print("error:", exc); sys.exit(0)
    print(got.fileno(), got.family.name, got.getblocking(), os.get_inheritable(3), "LISTEN_FDS" in os.environ)
    """
)


def run_child(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


def test_listen_socket_takes_fd_3_non_blocking_and_not_inherited(short_dir: Path) -> None:
    assert run_child("unix", str(short_dir / "s.sock")) == "3 AF_UNIX False False False"


def test_listen_socket_refuses_a_socket_that_is_not_a_unix_stream() -> None:
    assert run_child("udp") == "error: the socket passed by systemd is not a Unix stream socket"


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *lines: str) -> None:
        self.sent.append(lines)


def test_ready_is_sent_when_a_reload_before_start_up_loads_the_keys(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("unused\n")
    config = configuration.parse(
        {
            "vault": {"auth": {"method": "token", "token_file": str(token_file)}},
            "apps": {"default": {"app_id": "tApp", "path": "talkjs/x"}},
            "audit": {"file": str(tmp_path / "audit.log")},
        },
        str(tmp_path / "keyd.toml"),
    )
    daemon = Daemon(config)
    recorder = _Recorder()
    daemon.notifier = recorder  # type: ignore[assignment]
    daemon.reloads.waiting = {"default"}  # a SIGHUP arrived while keyd was still waiting for Vault
    key = SecretKey.from_str("sk_test_" + "k" * 24)
    daemon.store.record_success(KeySnapshot("default", key, key, version=1, kv_version=2, loaded_at=0.0))
    daemon._keys_changed("default")
    assert [lines[0] for lines in recorder.sent] == ["READY=1"]
    daemon._keys_changed("default")  # a later refresh: READY is not sent twice
    assert len(recorder.sent) == 1
    daemon.audit.close()
