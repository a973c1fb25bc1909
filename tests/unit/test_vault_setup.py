"""keyd.vault_setup without Vault: the generated policy, the shipped policy file, private files."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from keyd import config as configuration
from keyd.errors import KeydError
from keyd.ops.vault_setup import policy_paths, read_key, render_policy, write_private_file
from tests.helpers import ROOT


def make_config(**apps: dict[str, Any]) -> configuration.Config:
    return configuration.parse(
        {
            "vault": {"address": "http://127.0.0.1:8200"},
            "apps": {name: {"app_id": "t1", **a} for name, a in apps.items()},
        },
        "test.toml",
    )


def test_policy_reads_exactly_the_configured_paths_for_kv_v1_and_v2_and_webhook_keys() -> None:
    config = make_config(
        default={"path": "talkjs/live"},
        other={"kv_mount": "kv1", "kv_version": 1, "path": "talk/b", "webhook_path": "talk/hooks"},
        same={"path": "talkjs/live", "webhook_field": "hook_key"},  # same path: listed once
    )
    assert policy_paths(config) == ["kv1/talk/b", "kv1/talk/hooks", "secret/data/talkjs/live"]
    text = render_policy(config)
    capabilities = [line.strip() for line in text.splitlines() if "capabilities" in line]
    read, update = 'capabilities = ["read"]', 'capabilities = ["update"]'
    assert capabilities == [read, read, read, update, read, update]
    assert 'path "auth/approle/role/keyd/secret-id/lookup" {\n  capabilities = ["update"]\n}' in text
    assert 'path "auth/token/renew-self" {\n  capabilities = ["update"]\n}' in text
    assert 'path "auth/token/lookup-self" {\n  capabilities = ["read"]\n}' in text
    assert "*" not in text and "+" not in text and "list" not in text and "sys/" not in text
    assert render_policy(config) == text  # deterministic


def test_shipped_policy_is_the_one_generated_for_the_example_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/etc/keyd")
    config = configuration.load(ROOT / "config.example.toml")
    shipped = (ROOT / "deploy/vault/keyd-policy.hcl").read_text()
    generated = render_policy(config)
    assert shipped.endswith(generated), "regenerate: keyd vault setup -c config.example.toml --print-policy"
    preamble = shipped[: -len(generated)]
    assert all(line.startswith("#") or not line.strip() for line in preamble.splitlines())


def test_private_file_is_0600_atomic_and_idempotent(short_dir: Path) -> None:
    path = short_dir / "sub" / "secret-id"
    old_umask = os.umask(0)  # even a permissive umask must not loosen the mode
    try:
        assert write_private_file(str(path), "one\n") is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    inode = path.stat().st_ino
    assert write_private_file(str(path), "one\n") is False
    assert path.stat().st_ino == inode
    assert write_private_file(str(path), "two\n") is True
    assert path.read_text() == "two\n"
    assert path.stat().st_ino != inode, "replaced by rename, never rewritten in place"
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret-id"]


def test_private_file_with_loose_mode_is_replaced(short_dir: Path) -> None:
    path = short_dir / "role-id"
    path.write_text("same\n")
    path.chmod(0o644)
    assert write_private_file(str(path), "same\n") is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_private_file_is_never_readable_by_others_while_being_written(short_dir: Path) -> None:
    path = short_dir / "secret-id"
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for entry in short_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    seen.add(stat.S_IMODE(entry.stat().st_mode))

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        for i in range(200):
            write_private_file(str(path), f"value-{i}\n")
    finally:
        stop.set()
        thread.join()
    assert seen == {0o600}


def test_read_key_strips_the_newline_and_rejects_junk() -> None:
    assert read_key(io.StringIO("sk_test_abc\n"), "default") == "sk_test_abc"
    with pytest.raises(KeydError, match="held no key"):
        read_key(io.StringIO("\n"), "default")
    with pytest.raises(KeydError, match="whitespace"):
        read_key(io.StringIO("sk_test_a sk_test_b\n"), "default")


def test_the_command_lines_defaults_are_setup_options_defaults() -> None:
    """cli.py declares `keyd vault setup`'s options (so `keyd run` never imports this module);
    what it defaults to is what SetupOptions does."""
    from keyd.cli import build_parser
    from keyd.ops.vault_setup import SetupOptions

    args = build_parser().parse_args(["vault", "setup"])
    defaults = SetupOptions()
    given = (args.role, args.policy, args.token_ttl, args.token_max_ttl, args.secret_id_ttl, args.wrap_ttl)
    assert given == (
        defaults.role,
        defaults.policy,
        defaults.token_ttl,
        defaults.token_max_ttl,
        defaults.secret_id_ttl,
        defaults.wrap_ttl,
    )
    assert build_parser().parse_args(["vault", "setup", "--secret-id-ttl", "0"]).secret_id_ttl == 0.0
