"""The daemon's shutdown, in-process: a part that fails to close does not cost the audit log its lines.

keyd runs here on this test's event loop with its real socket server, audit log and (in one case)
metrics listener; the refresher reads from a fake Vault on a fake scheduler, so nothing leaves the
machine. The audit log flushes only when closed (a minute's flush interval), so every line recorded
before the stop is still buffered when the other parts close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyd import config as configuration
from keyd.daemon import containment
from keyd.daemon.callers.caller import Caller
from keyd.daemon.keys.refresher import Refresher
from keyd.daemon.observe.audit import AuditLog
from keyd.daemon.signing.decisions import Decision
from keyd.daemon.wiring import Daemon
from keyd.errors import StartupError
from tests.unit.test_refresher import FakeScheduler, FakeVault

CALLER = Caller(
    pid=4242,
    uid=33,
    gid=33,
    user="www-data",
    groups=frozenset({"www-data"}),
    gids=frozenset({33}),
    unit="php-fpm.service",
)


def daemon_in(directory: Path, metrics: dict[str, Any] | None = None) -> Daemon:
    token_file = directory / "token"
    token_file.write_text("unused\n")
    raw: dict[str, Any] = {
        "server": {"socket": str(directory / "keyd.sock")},
        "vault": {"auth": {"method": "token", "token_file": str(token_file)}},
        "apps": {"default": {"app_id": "tApp", "path": "talkjs/x"}},
        "audit": {"file": str(directory / "audit.log")},
    }
    if metrics is not None:
        raw["metrics"] = metrics
    config = configuration.parse(raw, str(directory / "keyd.toml"))
    daemon = Daemon(config, audit=AuditLog(config.audit, flush_interval=60.0))
    vault = FakeVault(time.time)
    vault.secrets[("secret", "talkjs/x", "secret_key")] = ("sk_test_" + "k" * 24, 1)
    daemon.refresher = Refresher(
        dict(config.apps),
        config.refresh,
        vault,
        daemon.store,
        on_change=daemon._after_attempt,
        scheduler=FakeScheduler(),
    )
    return daemon


@pytest.fixture(autouse=True)
def _no_containment(monkeypatch: pytest.MonkeyPatch) -> None:
    """harden() would make the test process itself undumpable (its /proc files root's)."""
    monkeypatch.setattr(containment, "harden", lambda: None)
    monkeypatch.setattr(containment, "raise_nofile", lambda: None)


def serve_then_stop(daemon: Daemon, lines: int) -> BaseException | None:
    """Run keyd until its socket is up, record ``lines`` audit lines, SIGTERM it (stop()), wait;
    what ``run()`` raised, if anything (the tests check the audit file first)."""

    async def main() -> BaseException | None:
        task = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + 10
        while daemon.server._server is None:
            assert time.monotonic() < deadline, "keyd did not start"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        for n in range(lines):
            daemon.audit.record(Decision(CALLER, "default", "user", f"user-{n}", 60, "issued", None))
        daemon.stop()
        try:
            await asyncio.wait_for(task, 30)
        except Exception as exc:
            return exc
        return None

    return asyncio.run(main())


def audit_subs(directory: Path) -> list[str]:
    text = (directory / "audit.log").read_text(encoding="utf-8")
    return [line.split('"sub":"')[1].split('"')[0] for line in text.splitlines() if '"sub":"' in line]


def _raise(exc: Exception) -> Callable[[], None]:
    def close() -> None:
        raise exc

    return close


def test_the_audit_lines_reach_the_file_when_the_vault_client_fails_to_close(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_in(short_dir)
    monkeypatch.setattr(daemon.vault, "close", _raise(RuntimeError("a session would not close")))
    with caplog.at_level(logging.INFO, logger="keyd"):
        raised = serve_then_stop(daemon, lines=3)
    assert audit_subs(short_dir) == ["user-0", "user-1", "user-2"]
    assert raised is None
    failed = [r for r in caplog.records if r.getMessage() == "error while closing the Vault client"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert caplog.records[-1].getMessage() == "stopped"
    assert not (short_dir / "keyd.sock").exists()


def test_the_audit_lines_reach_the_file_when_the_metrics_listener_fails_to_close(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_in(short_dir, metrics={"listen": "127.0.0.1:0"})
    listener = daemon.metrics_tcp
    assert listener is not None
    real_close = listener.close

    async def close() -> None:
        await real_close()  # the port is still released: only the error is injected
        raise OSError("the listener would not close")

    monkeypatch.setattr(listener, "close", close)
    with caplog.at_level(logging.INFO, logger="keyd"):
        raised = serve_then_stop(daemon, lines=2)
    assert audit_subs(short_dir) == ["user-0", "user-1"]
    assert raised is None
    failed = [r for r in caplog.records if r.getMessage() == "error while closing the metrics listener"]
    assert len(failed) == 1 and failed[0].exc_info is not None


def test_every_part_closes_in_reverse_of_its_start(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = daemon_in(short_dir, metrics={"listen": "127.0.0.1:0"})
    closed: list[str] = []

    def spy(obj: Any, method: str, name: str) -> None:
        real = getattr(obj, method)

        def close() -> Any:
            closed.append(name)
            return real()

        monkeypatch.setattr(obj, method, close)

    assert daemon.metrics_tcp is not None
    spy(daemon.server, "shutdown", "server")
    spy(daemon.refresher, "stop", "refresher")
    spy(daemon.vault, "close", "vault")
    spy(daemon.metrics_tcp, "close", "metrics")
    spy(daemon.audit, "close", "audit")
    spy(daemon.notifier, "close", "notifier")
    assert serve_then_stop(daemon, lines=1) is None
    assert closed == ["server", "refresher", "vault", "metrics", "audit", "notifier"]
    assert audit_subs(short_dir) == ["user-0"]


def test_a_grant_reload_still_running_at_shutdown_is_cancelled(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = daemon_in(short_dir)
    ended: list[str] = []

    async def slow_reread() -> str:
        try:
            await asyncio.sleep(3600)  # a config file on a hung network mount
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        return ""

    monkeypatch.setattr(daemon, "_reread_grants", slow_reread)

    async def main() -> None:
        task = asyncio.create_task(daemon.run())
        while daemon.server._server is None:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        scheduler = daemon.refresher._scheduler
        assert isinstance(scheduler, FakeScheduler)

        async def read_keys() -> None:
            for job in list(scheduler.pending):
                scheduler.run(job)
            await asyncio.sleep(0.05)

        await read_keys()  # the first read: keyd is ready
        daemon.reload()  # what SIGHUP does: the keys are re-read (a fake Vault), the grants hang
        await read_keys()
        assert daemon.reloads.last is None  # the reload waits for its grants
        daemon.stop()
        await asyncio.wait_for(task, 10)
        # Checked here: asyncio.run would cancel a leftover task itself on the way out.
        assert ended == ["cancelled"] and not daemon._grant_reloads
        assert daemon.reloads.last is None  # an abandoned reload is no verdict, least of all "ok"

    asyncio.run(main())


def test_a_start_that_fails_half_way_closes_what_had_started(short_dir: Path) -> None:
    """The socket cannot be bound (a file is in the way): the metrics listener that was already up
    closes, the audit log closes, and the refresher never started (Vault is not asked)."""
    daemon = daemon_in(short_dir, metrics={"listen": "127.0.0.1:0"})
    (short_dir / "keyd.sock").write_text("not a socket\n")
    listener = daemon.metrics_tcp
    assert listener is not None

    async def main() -> None:
        with pytest.raises(StartupError, match="exists and is not a socket"):
            await daemon.run()

    asyncio.run(main())
    assert listener._server is None
    assert daemon.audit._fd == -1
    scheduler = daemon.refresher._scheduler
    assert isinstance(scheduler, FakeScheduler) and scheduler.scheduled == []


def test_a_second_ctrl_c_while_closing_does_not_cut_the_closing_short(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: the signal handlers went before the parts closed, so a second Ctrl-C raised
    KeyboardInterrupt in the middle of closing and the buffered audit lines were lost."""
    daemon = daemon_in(short_dir)
    real_close = daemon.vault.close

    def close_with_signals() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the operator presses Ctrl-C again
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)  # Python runs a signal's handler between bytecodes: it would raise here
        real_close()

    monkeypatch.setattr(daemon.vault, "close", close_with_signals)
    with caplog.at_level(logging.INFO, logger="keyd"):
        raised = serve_then_stop(daemon, lines=2)
    assert raised is None
    assert audit_subs(short_dir) == ["user-0", "user-1"]
    assert caplog.records[-1].getMessage() == "stopped"


def test_a_start_that_fails_after_binding_leaves_no_socket_file(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = daemon_in(short_dir)

    def fail() -> None:
        assert (short_dir / "keyd.sock").is_socket()  # bound, listening, not served yet
        raise RuntimeError("the scheduler would not start")

    monkeypatch.setattr(daemon.refresher, "start", fail)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="would not start"):
            await daemon.run()

    asyncio.run(main())
    assert not (short_dir / "keyd.sock").exists()
    assert daemon.audit._fd == -1
