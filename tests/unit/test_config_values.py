"""keyd.config_values: the Reader, settings declared as dataclass fields, and read_settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from keyd import config
from keyd.config_values import Reader, nonempty, positive_int, read_settings, setting
from keyd.errors import ConfigError

SOURCE = "/etc/keyd/test.toml"


@dataclasses.dataclass(frozen=True, slots=True)
class Inner:
    depth: int = setting(1, positive_int)


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    name: str  # given
    size: int = setting(3, positive_int)
    inner: Inner = Inner()
    label: str = setting("x", nonempty)
    untouched: str = "kept"  # neither a setting nor a table: keeps its default


def _inner(r: Reader) -> Inner:
    return read_settings(r, Inner)


def test_read_settings_reads_each_setting_in_declaration_order_with_defaults_for_bad_values() -> None:
    problems: list[str] = []
    table = {"label": "", "inner": {"depth": 0}, "size": "big", "untouched": "read?"}
    r = Reader(SOURCE, problems, "section", table)
    got = read_settings(r, Section, tables={"inner": _inner}, name="given")
    assert got == Section(name="given", size=3, inner=Inner(depth=1), label="x", untouched="kept")
    assert problems == [
        f"{SOURCE}: section.size: must be an integer, not str",
        f"{SOURCE}: section.inner.depth: must be greater than zero",
        f"{SOURCE}: section.label: must not be empty",
    ]
    r.finish()  # what the section did not declare is an unknown key
    assert problems[-1] == f"{SOURCE}: section.untouched: unknown key"


def test_read_settings_takes_present_values() -> None:
    r = Reader(SOURCE, [], "", {"size": 7, "inner": {"depth": 2}, "label": "y"})
    assert read_settings(r, Section, tables={"inner": _inner}, name="n") == Section("n", 7, Inner(2), "y")
    assert r.problems == []


# Fields that are no setting of their own: read by their section's reader, or given by the parser.
NOT_SETTINGS = {
    ("VaultConfig", "address"),
    ("VaultConfig", "addresses"),
    ("VaultConfig", "auth"),
    ("AppConfig", "name"),
    ("AppConfig", "app_id"),
    ("AppConfig", "rest"),
    ("GrantConfig", "index"),
}
SECTIONS: list[tuple[type[Any], str]] = [
    (config.ServerConfig, "server"),
    (config.VaultConfig, "vault"),
    (config.VaultAuthConfig, "vault.auth"),
    (config.RefreshConfig, "refresh"),
    (config.AppConfig, "apps.default"),
    (config.RestConfig, "apps.default.rest"),
    (config.GrantConfig, "grant[0]"),
    (config.AuditConfig, "audit"),
    (config.LogConfig, "log"),
    (config.MetricsConfig, "metrics"),
]


def _with(section: str, key: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"apps": {"default": {"app_id": "tApp"}}}
    if section == "grant[0]":
        data["grant"] = [{"uid": 1, key: value}]
        return data
    table = data
    for part in section.split("."):
        table = table.setdefault(part, {})
    table[key] = value
    return data


@pytest.mark.parametrize(
    ("cls", "section", "key"),
    [
        (cls, section, f.name)
        for cls, section in SECTIONS
        for f in dataclasses.fields(cls)
        if (cls.__name__, f.name) not in NOT_SETTINGS
    ],
)
def test_every_setting_is_read_from_the_key_of_its_name(cls: type[Any], section: str, key: str) -> None:
    """A value no converter takes (a table) is refused naming the file and that very key."""
    with pytest.raises(ConfigError) as info:
        config.parse(_with(section, key, {"a": 1}), SOURCE)
    assert any(p.startswith(f"{SOURCE}: {section}.{key}: ") for p in info.value.problems), info.value.problems
