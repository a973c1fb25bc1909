"""The systemd status line and the end of a reload, from the daemon's parts with a fake clock: serving,
degraded (how much of max_stale is used, and why), unavailable (not signing, and why), which Vault
node is in use when one fails, and a reload that failed for one app named as such."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd import config as configuration
from keyd.daemon.keys.keystore import KeySnapshot, KeyStore, SecretKey
from keyd.daemon.keys.refresher import Refresher, key_job
from keyd.daemon.wiring import Daemon
from keyd.errors import SecretError
from tests.unit.test_refresher import FakeScheduler, FakeVault


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *lines: str) -> None:
        self.sent.append(lines)


def daemon_with(tmp_path: Path, nodes: list[str]) -> tuple[Daemon, Clock]:
    token_file = tmp_path / "token"
    token_file.write_text("unused\n")
    config = configuration.parse(
        {
            "vault": {"address": nodes, "auth": {"method": "token", "token_file": str(token_file)}},
            "refresh": {"max_stale": "1h"},
            "apps": {"live": {"app_id": "tLive", "path": "talkjs/live"}, "test": {"app_id": "tTest"}},
            "audit": {"file": str(tmp_path / "audit.log")},
        },
        str(tmp_path / "keyd.toml"),
    )
    daemon = Daemon(config)
    clock = Clock()
    daemon.store = KeyStore(config.apps, config.refresh.max_stale, clock=clock)
    key = SecretKey.from_str("sk_test_" + "k" * 24)
    for app in config.apps:
        daemon.store.record_success(KeySnapshot(app, key, key, version=1, kv_version=2, loaded_at=clock.now))
    return daemon, clock


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Daemon, Clock]]:
    daemon, clock = daemon_with(tmp_path, ["https://v1:8200", "https://v2:8200"])
    yield daemon, clock
    daemon.audit.close()


def test_serving_degraded_and_unavailable_say_so_with_the_cause(two_nodes: tuple[Daemon, Clock]) -> None:
    daemon, clock = two_nodes
    clock.now += 12
    assert daemon.status_line() == "serving 2 app(s), keys 12 s old"
    daemon.store.record_failure("live", "reading secret/talkjs/live ...: Vault is sealed or down (503)", "sealed")
    assert daemon.status_line() == (
        "degraded (signing with the last good key, 12 s of max_stale 60 m used): app live (sealed); serving test"
    )
    clock.now += 3600
    daemon.store.record_failure("live", "x", "permission denied on secret/data/talkjs/live")
    line = daemon.status_line()
    assert line.startswith("unavailable: not signing for app live (permission denied on secret/data/talkjs/live)")
    assert "no refresh for 60 m" in line


def test_a_failing_node_is_named_with_the_node_in_use(two_nodes: tuple[Daemon, Clock]) -> None:
    daemon, _ = two_nodes
    failover = daemon.vault._failover
    failover.failed(failover.nodes[0], "https://v1:8200: cannot connect to Vault", "node unreachable")
    failover.succeeded(failover.nodes[1])
    assert daemon.status_line().endswith(
        "; Vault node https://v2:8200 in use; failing: https://v1:8200 (node unreachable)"
    )


def test_a_reload_that_failed_for_one_app_says_which_and_why(two_nodes: tuple[Daemon, Clock]) -> None:
    daemon, clock = two_nodes
    recorder = Recorder()
    daemon.notifier = recorder  # type: ignore[assignment]
    daemon._ready_sent = True
    # The daemon's refresher, on a fake Vault and a fake scheduler: the test runs each job.
    vault = FakeVault(clock)
    for app in daemon.config.apps.values():
        vault.secrets[(app.kv_mount, app.path, app.field)] = ("sk_test_" + "k" * 24, 1)
    scheduler = FakeScheduler()
    daemon.refresher = Refresher(
        dict(daemon.config.apps),
        daemon.config.refresh,
        vault,
        daemon.store,
        clock=clock,
        on_change=daemon._keys_changed,
        scheduler=scheduler,
    )
    daemon.refresher.start()

    def sighup_during_the_read() -> None:
        vault.on_read = None
        daemon.reload()

    vault.on_read = sighup_during_the_read
    scheduler.run(key_job("live"))  # under way when the SIGHUP came: it does not count for the reload
    assert recorder.sent[0][0] == "RELOADING=1"
    assert len(recorder.sent) == 1 and daemon.reloads.waiting == {"live", "test"}
    # The reads the SIGHUP started: live's secret lost its field, test's is fine.
    vault.read_errors = [
        SecretError("reading secret/talkjs/live: the secret has no field", "malformed secret at secret/talkjs/live")
    ]
    scheduler.run(key_job("live"))
    assert len(recorder.sent) == 1  # test's read is still to come
    scheduler.run(key_job("test"))
    ready = recorder.sent[-1]
    assert ready[0] == "READY=1"
    assert ready[1].startswith("STATUS=reload failed: app live: malformed secret at secret/talkjs/live; now degraded")
