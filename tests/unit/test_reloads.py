"""keyd.daemon.reloads: when a SIGHUP reload is complete, and its verdict (count, ok, when, why)."""

from __future__ import annotations

import logging

import pytest

from keyd.daemon.keys.health import ReloadHealth
from keyd.daemon.reloads import Reloads


def test_a_reload_finishes_once_every_key_and_the_grants_were_read() -> None:
    reloads = Reloads(clock=lambda: 1234.5)
    assert reloads.finish() is None and reloads.last is None  # no reload yet
    reloads.begin(["live", "test"], generation=3, grants=True)
    assert not reloads.counts("live", 2)  # under way before the SIGHUP: not this reload's
    assert reloads.counts("live", 3)
    assert not reloads.key_read("live", None)
    assert reloads.finish() is None  # test's key is still to come
    assert reloads.key_read("test", None)
    assert not reloads.counts("test", 4)  # read already: a later attempt does not count again
    assert reloads.finish() is None  # the config file is still being read
    reloads.grants_read()
    verdict = reloads.finish()
    assert verdict == ReloadHealth(count=1, ok=True, at=1234.5, error="")
    assert reloads.last is verdict
    assert reloads.finish() is None  # reported once


def test_a_failed_reload_names_the_config_file_and_each_app(caplog: pytest.LogCaptureFixture) -> None:
    reloads = Reloads(clock=lambda: 1.0)
    reloads.begin(["live", "test"], generation=1, grants=True)
    reloads.key_read("test", "permission denied on secret/data/talkjs/test")
    reloads.key_read("live", None)
    reloads.grants_read("keyd.toml: grant[0].uid: unknown user 'nobody2'")
    with caplog.at_level(logging.ERROR, logger="keyd.daemon"):
        verdict = reloads.finish()
    assert verdict is not None and not verdict.ok
    assert verdict.error == (
        "keyd.toml: grant[0].uid: unknown user 'nobody2'; app test: permission denied on secret/data/talkjs/test"
    )
    [record] = caplog.records
    assert record.getMessage().startswith("reload failed (config, test): ")
    assert record.__dict__["apps"] == ["test"]


def test_each_sighup_starts_afresh_and_counts() -> None:
    reloads = Reloads()
    reloads.begin(["live"], generation=1, grants=False)
    reloads.key_read("live", "sealed")
    first = reloads.finish()
    assert first is not None and not first.ok and first.count == 1
    reloads.begin(["live"], generation=2, grants=False)
    assert reloads.waiting == {"live"}
    reloads.key_read("live", None)
    second = reloads.finish()
    assert second is not None and second.ok and second.count == 2
