"""Scenario 6: a slow Vault (a delaying TCP proxy between keyd and OpenBao) never slows signing."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from keyd.ops.dev import free_port
from tests.conftest import new_key
from tests.helpers import wait_until
from tests.resilience.support import Load, keyd_config

DELAY = 1.5  # seconds added to every Vault answer; keyd's vault.timeout is 2 s


class DelayProxy:
    """Forwards 127.0.0.1:port to OpenBao, holding every chunk of Vault's answers ``delay`` seconds."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = 0.0
        self.delayed = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if slow and self.delay:
                    self.delayed += 1
                    time.sleep(self.delay)
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def proxy(vault) -> Iterator[DelayProxy]:
    p = DelayProxy(vault.port)
    try:
        yield p
    finally:
        p.close()


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(len(ordered) * 0.99)]


def test_6_a_slow_vault_does_not_slow_signing(vault, proxy, approle_files, start_keyd, short_dir, report):
    vault.write_key(new_key())
    keyd = start_keyd(keyd_config(proxy.address, short_dir, approle_files, interval="1s"))
    with Load(keyd.socket) as load:
        load.wait_for(500)
        baseline = list(load.latencies)
        proxy.delay = DELAY
        slow_from = len(load.latencies)
        # Refreshes now take 1.5 s each; SIGHUPs pile more of them onto the refresher.
        for _ in range(3):
            keyd.signal(signal.SIGHUP)
            time.sleep(1.0)
        wait_until(lambda: proxy.delayed >= 2, 10, what="Vault answers delayed by the proxy")
        time.sleep(1.0)
        during = load.latencies[slow_from:]
        proxy.delay = 0.0
    report(f"6. slow Vault (+{DELAY} s per answer)", load)

    assert load.failures() == 0, load.summary()
    assert len(during) > 100
    # No request waited for Vault: even the slowest is far below one delayed Vault answer...
    assert max(during) < DELAY / 3, f"max {max(during):.3f}s"
    # ...and the tail stays where it was (generous: this machine is shared and noisy).
    assert _p99(during) < max(10 * _p99(baseline), 0.05), (_p99(baseline), _p99(during))
