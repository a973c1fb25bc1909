"""Honest signals (issue 11): a SIGHUP reload that fails for an app says so in the log (one error line
per app), and in systemd's STATUS, sent with the READY=1 that ends the reload (never the "every app's
key was re-read" of a success). The status line tells "degraded (signing with the last good key, ...)"
from "unavailable: not signing" and names the cause.

systemd is stood in for by a datagram socket the test owns (NOTIFY_SOCKET), as in test_systemd.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_config, new_key
from tests.helpers import wait_until
from tests.integration.test_systemd import NotifyListener


@pytest.fixture
def notify(short_dir: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_dir / "notify.sock")
    try:
        yield listener
    finally:
        listener.close()


def statuses_since(notify: NotifyListener, start: int) -> list[str]:
    return [
        line.removeprefix("STATUS=")
        for _, _, text in notify.messages[start:]
        for line in text.split("\n")
        if line.startswith("STATUS=")
    ]


def messages_since(notify: NotifyListener, start: int) -> list[list[str]]:
    return [text.split("\n") for _, _, text in notify.messages[start:]]


def test_a_failed_reload_is_reported_as_failed_and_the_status_line_names_the_cause(
    bao, root, short_dir, keyd_factory, notify
):
    good, bad = "talkjs/good-" + os.urandom(4).hex(), "talkjs/bad-" + os.urandom(4).hex()
    for path in (good, bad):
        root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": new_key()}, mount_point="secret")
    config = base_config(bao, short_dir, good)
    config["apps"]["bad"] = {"app_id": "tBadApp", "path": bad}
    config["refresh"].update(interval="1s", max_stale="6s", retry_min="0.5s", retry_max="1s")
    env = {
        "VAULT_TOKEN": root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"],
        "NOTIFY_SOCKET": notify.path,
    }
    keyd = keyd_factory(config, env=env)
    wait_until(lambda: "READY=1" in notify.lines(), what="READY=1")

    # A successful reload first: the success line and a plain READY=1.
    start = len(notify.messages)
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: any("READY=1" in m for m in messages_since(notify, start)), what="READY after reload")
    wait_until(lambda: "reload finished: every app's key was re-read" in keyd.logs(), what="success line")

    # Break one app's secret (no secret_key field), then reload.
    root.secrets.kv.v2.create_or_update_secret(path=bad, secret={"other": "x"}, mount_point="secret")
    logs_before = len(keyd.logs())
    start = len(notify.messages)
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: any("READY=1" in m for m in messages_since(notify, start)), what="READY ending the reload")
    messages = messages_since(notify, start)
    reloading = next(i for i, m in enumerate(messages) if "RELOADING=1" in m)
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert reloading < ready
    ready_status = next(line for line in messages[ready] if line.startswith("STATUS="))
    assert ready_status.startswith("STATUS=reload failed: app bad: malformed secret at secret/" + bad), ready_status
    assert "app default" not in ready_status.split("; now")[0]  # only the app that failed is named
    new_logs = keyd.logs()[logs_before:]
    assert "every app's key was re-read" not in new_logs
    assert "reload: app bad: the key could not be re-read: reading secret/" + bad in new_logs
    assert "reload failed (bad): app bad: " in new_logs
    assert "reload: app default" not in new_logs

    # The periodic status line: degraded (still signing), then unavailable past max_stale, with the cause.
    wait_until(
        lambda: any(
            s.startswith("degraded (signing with the last good key, ")
            and "of max_stale 6 s used): app bad (malformed secret at secret/" + bad in s
            for s in statuses_since(notify, start)
        ),
        timeout=12,
        what="a degraded status line",
    )
    wait_until(
        lambda: any(
            s.startswith("unavailable: not signing for app bad (malformed secret at secret/" + bad)
            and "serving default" in s
            for s in statuses_since(notify, start)
        ),
        timeout=15,
        what="an unavailable status line",
    )
    status, _ = keyd.http().post_json("/v1/tokens", {"user_id": "alice", "app": "bad"})
    assert status == 503
    status, _ = keyd.http().post_json("/v1/tokens", {"user_id": "alice", "app": "default"})
    assert status == 200
