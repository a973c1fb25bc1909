"""`keyd check-config` warnings (keyd.ops.grants.warnings): one per risky grant shape, none for a tight
policy. Group sizes come from a patched member list; names that must exist use root's user and group."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from keyd import cli
from keyd.config import AppConfig, Config, GrantConfig, ServerConfig
from keyd.ops import grants
from tests.helpers import built_config

APP = AppConfig(name="default", app_id="tA", path="talkjs/a")


def config(*grant_list: GrantConfig, socket_mode: int = 0o660) -> Config:
    return built_config(APP, grants=grant_list, server=replace(ServerConfig(), socket_mode=socket_mode))


def one(found: list[str]) -> str:
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def big_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group "staff" has 9 members, every other group 2."""
    monkeypatch.setattr(
        grants,
        "group_members",
        lambda group, gid: {f"u{i}" for i in range(9 if group == "staff" else 2)},
    )


@pytest.mark.parametrize("kind", ["signature", "webhook"])
def test_signature_or_webhook_for_every_caller(kind: str) -> None:
    line = one(grants.warnings(config(GrantConfig(index=0, types=("user", kind)))))
    assert line.startswith("test.toml: grant[0]: warning: allows ")
    assert f"{kind} (" in line and "every caller that can open the socket" in line
    assert "grant them to a user or uid" in line


def test_signature_and_webhook_for_a_big_group(big_groups: None) -> None:
    line = one(grants.warnings(config(GrantConfig(index=0, group="staff", types=("signature", "webhook")))))
    assert "signature (legacy signatures" in line and "webhook (webhook verification" in line
    assert "group 'staff', which has 9 members" in line
    assert grants.warnings(config(GrantConfig(index=0, group="root", types=("signature", "webhook")))) == []


def test_signature_for_a_unit_alone() -> None:
    line = one(grants.warnings(config(GrantConfig(index=0, unit="php-fpm.service", types=("signature",)))))
    assert "signature" in line and "any user's process in unit 'php-fpm.service'" in line
    tight = GrantConfig(index=0, unit="php-fpm.service", user="root", types=("signature",))
    assert grants.warnings(config(tight)) == []


def test_app_tokens_for_a_unit_alone() -> None:
    line = one(grants.warnings(config(GrantConfig(index=0, unit="talkjs-sync.service", types=("app",)))))
    assert "app tokens (full admin access to TalkJS)" in line
    assert (
        "unit 'talkjs-sync.service'" in line and "a unit name alone is no identity; add user or uid" in line
    )
    assert (
        grants.warnings(config(GrantConfig(index=0, unit="talkjs-sync.service", uid=0, types=("app",)))) == []
    )


def test_app_tokens_for_every_caller_and_a_big_group(big_groups: None) -> None:
    line = one(grants.warnings(config(GrantConfig(index=0, types=("app",)))))
    assert "app tokens (full admin access to TalkJS) to every caller" in line
    line = one(grants.warnings(config(GrantConfig(index=0, gid=50, group="staff", types=("app",)))))
    assert "group 'staff', which has 9 members" in line


def test_a_user_or_group_that_does_not_exist() -> None:
    found = grants.warnings(
        config(GrantConfig(index=0, user="kd-nobody-here", group="kd-no-group", types=("user",)))
    )
    assert len(found) == 2
    assert "no user named 'kd-nobody-here' on this host: matches whoever is given that name later" in found[0]
    assert "no group named 'kd-no-group' on this host" in found[1]


def test_a_world_open_socket_with_a_grant_for_every_caller() -> None:
    line = one(grants.warnings(config(socket_mode=0o666)))
    assert line.startswith("test.toml: server.socket_mode: warning: 0666 lets every local user open")
    assert "the default grant" in line
    line = one(
        grants.warnings(
            config(GrantConfig(index=0, uid=0, types=("app",)), GrantConfig(index=1), socket_mode=0o666)
        )
    )
    assert "grant[1] matches every caller" in line
    assert grants.warnings(config(GrantConfig(index=0, uid=0), socket_mode=0o666)) == []


def test_a_tight_policy_has_no_warnings(big_groups: None) -> None:
    tight = config(
        GrantConfig(index=0, user="root", unit="talkjs-sync.service", types=("app",)),
        GrantConfig(index=1, uid=0, types=("user", "signature", "webhook")),
        GrantConfig(index=2, group="root", types=("user", "signature")),
        GrantConfig(index=3, types=("user",)),  # the usual catch-all: user tokens only
    )
    assert grants.warnings(tight) == []


def _write(tmp: Path, grants_toml: str) -> Path:
    path = tmp / "keyd.toml"
    path.write_text(
        '[vault]\naddress = "http://127.0.0.1:8200"\n[vault.auth]\nmethod = "token"\n'
        f'token_file = "{tmp / "token"}"\n[apps.default]\napp_id = "tA"\n' + grants_toml
    )
    (tmp / "token").write_text("x")
    return path


def test_cli_prints_each_warning_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    risky = (
        '[[grant]]\nunit = "talkjs-sync.service"\ntypes = ["app"]\n'
        '[[grant]]\nunit = "php-fpm.service"\ntypes = ["user", "signature"]\n'
        '[[grant]]\ntypes = ["user", "webhook"]\n'
    )
    assert cli.main(["check-config", "-c", str(_write(tmp_path, risky))]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    lines = out.err.splitlines()
    assert [line.split(": warning: ")[0].rsplit(": ", 1)[1] for line in lines] == [
        "grant[0]",
        "grant[1]",
        "grant[2]",
    ]
    assert "unit name alone" in lines[0] and "signature" in lines[1] and "webhook" in lines[2]
    clean = '[[grant]]\nuser = "root"\ntypes = ["app", "signature", "webhook"]\n[[grant]]\ntypes = ["user"]\n'
    assert cli.main(["check-config", "-c", str(_write(tmp_path, clean))]) == 0
    assert capsys.readouterr().err == ""
