"""config.example.toml documents every option the parser reads, with the parser's real default.

The example is what an operator copies (and what `make deb` installs as /etc/keyd/config.toml), so a
key the parser accepts but the example never mentions is an undocumented option, and a value the
example shows under "every option, with its default" that differs from the code's default is a
documentation bug.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from keyd import config, config_values
from tests.helpers import ROOT

EXAMPLE = ROOT / "config.example.toml"

# Values the example sets on purpose to something other than the default, because the option has no
# useful default (an address, your app id) or because the grants are illustrations.
EXAMPLE_VALUES = {
    ("vault", "address"),  # default http://127.0.0.1:8200, which the example says in a comment
    ("apps.NAME", "app_id"),  # required
}


def _section(prefix: str) -> str:
    """``apps.default.rest`` -> ``apps.NAME.rest``; ``grant[1]`` -> ``grant``."""
    prefix = re.sub(r"^apps\.[^.]+", "apps.NAME", prefix)
    return re.sub(r"^grant\[\d+\]", "grant", prefix)


def _keys_the_parser_reads(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """Every (section, key) the parser looks up while reading the example (and a full grant)."""
    read: set[tuple[str, str]] = set()
    real_get = config_values.Reader.get

    def get(self: Any, name: str, default: Any, convert: Any) -> Any:
        read.add((_section(self.prefix), name))
        return real_get(self, name, default, convert)

    monkeypatch.setattr(config_values.Reader, "get", get)
    config.load(EXAMPLE)
    # Keys read outside Reader.get: vault.address / vault.addresses (one or a list of nodes).
    read |= {("vault", "address"), ("vault", "addresses")}
    return read


def _example_sections() -> dict[str, str]:
    """The example's text per table, comments included (grants merged into one "grant" section)."""
    sections: dict[str, str] = {}
    current = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^\[\[?([A-Za-z0-9_.]+)\]\]?\s*$", line)
        if header:
            current = _section(header.group(1))
            continue
        sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_every_key_the_parser_reads_is_in_the_example(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _keys_the_parser_reads(monkeypatch)
    sections = _example_sections()
    # The parser reads a sensible number of keys: this test would pass vacuously on an empty set.
    assert len(keys) > 50, sorted(keys)
    assert {("grant", "user_unit"), ("apps.NAME.rest", "token_ttl"), ("server", "socket")} <= keys
    missing = [
        f"[{section}] {key}"
        for section, key in sorted(keys)
        if not re.search(rf"(^|[\s#`]){re.escape(key)}\s*=", sections.get(section, ""), re.MULTILINE)
    ]
    assert missing == [], f"read by keyd/config.py but not in config.example.toml: {missing}"


def test_every_key_in_the_example_is_one_the_parser_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _keys_the_parser_reads(monkeypatch)
    unknown = []
    for section, text in _example_sections().items():
        for match in re.finditer(r"^([a-z_]+)\s*=", text, re.MULTILINE):
            if (section, match.group(1)) not in keys:
                unknown.append(f"[{section}] {match.group(1)}")
    assert unknown == []


def _documented_defaults() -> list[tuple[str, str, Any, Any]]:
    """(section, key, value in the example, the code's default) for every option the example sets."""
    cfg = config.load(EXAMPLE)
    app = cfg.apps["default"]
    pairs: list[tuple[str, Any, Any]] = [
        ("server", cfg.server, config.ServerConfig()),
        ("vault", cfg.vault, config.VaultConfig()),
        ("vault.auth", cfg.vault.auth, config.VaultAuthConfig()),
        ("refresh", cfg.refresh, config.RefreshConfig()),
        ("apps.NAME", app, config.AppConfig(name="default", app_id="")),
        ("apps.NAME.rest", app.rest, config.RestConfig()),
        ("audit", cfg.audit, config.AuditConfig()),
        ("log", cfg.log, config.LogConfig()),
        ("metrics", cfg.metrics, config.MetricsConfig()),
    ]
    rows = []
    for section, value, default in pairs:
        for field in dataclasses.fields(default):
            mine, theirs = getattr(value, field.name), getattr(default, field.name)
            if dataclasses.is_dataclass(theirs):
                continue  # a nested table, compared on its own
            rows.append((section, field.name, mine, theirs))
    return rows


def test_the_example_shows_the_code_defaults() -> None:
    rows = _documented_defaults()
    assert len(rows) > 40
    wrong = [
        f"[{section}] {key} = {mine!r} in the example, {theirs!r} in keyd/config.py"
        for section, key, mine, theirs in rows
        if mine != theirs and (section, key) not in EXAMPLE_VALUES
    ]
    assert wrong == [], "config.example.toml claims these are defaults: " + "; ".join(wrong)


def test_the_example_names_the_vault_address_default() -> None:
    default = config.VaultConfig().address
    assert f'Default (when unset): "{default}"' in _example_sections()["vault"]


def test_the_example_passes_check_config_with_credential_paths_as_packaged(tmp_path: Path) -> None:
    """What README/deploy.md tell an operator to run, on the example with the packaged credential paths."""
    import subprocess
    import sys

    text = EXAMPLE.read_text()
    for name in ("role-id", "secret-id"):
        assert f'"/etc/keyd/{name}"' in text
        text = text.replace(f'"/etc/keyd/{name}"', f'"${{CREDENTIALS_DIRECTORY}}/{name}"')
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)  # as keyd vault setup writes them (check-config checks)
    path = tmp_path / "config.toml"
    path.write_text(text)
    env = {"PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "keyd", "check-config", "-c", str(path), "--credentials-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok (1 app(s): default)" in run.stdout
    # The example follows its own advice (README "Who may ask for what"): no grant draws a warning
    # that keyd check-config prints for a risky grant, other than a user or group name this host may
    # not have.
    warnings = [
        line
        for line in run.stderr.splitlines()
        if "warning" in line and not re.search(r"warning: no (user|group) named", line)
    ]
    assert warnings == [], warnings


def test_the_packaged_config_loads_with_its_example_grants_commented_out(tmp_path: Path) -> None:
    """/etc/keyd/config.toml as the Debian package ships it (packaging/debian/packaged-config.sh):
    it loads, keyd check-config warns about nothing, and no grant is switched on (the README's
    example grants named a user that does not exist and rate-limited a whole web tier)."""
    import subprocess
    import sys

    packaged = subprocess.run(
        ["sh", str(ROOT / "packaging" / "debian" / "packaged-config.sh"), str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "# [[grant]]" in packaged and "grant" not in tomllib.loads(packaged)
    assert 'file = "/var/log/keyd/audit.log"' in packaged  # the package creates that directory
    path = tmp_path / "config.toml"
    path.write_text(packaged.replace('"/var/log/keyd/audit.log"', f'"{tmp_path}/audit.log"'))
    for name in ("role-id", "secret-id"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)  # as keyd vault setup writes them (check-config checks)
    run = subprocess.run(
        [sys.executable, "-m", "keyd", "check-config", "-c", str(path), "--credentials-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warning" not in run.stderr, run.stderr
