"""keyd.config: TOML -> frozen dataclasses; every problem named by file and key path."""

from __future__ import annotations

import dataclasses
import grp
import os
from pathlib import Path
from typing import Any

import pytest

from keyd import config
from keyd.errors import ConfigError
from tests.helpers import ROOT, minimal_config, to_toml

SOURCE = "/etc/keyd/test.toml"


def problems_of(data: dict[str, Any], source: str = SOURCE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(data, source)
    return info.value.problems


def one_problem(data: dict[str, Any]) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("0.2s", 0.2),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        (" 5m ", 300.0),
    ],
)
def test_durations_accept_seconds_and_unit_strings(value: object, seconds: float) -> None:
    assert config.parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "5x", "m", "5 m", "1h 30m", "-5s", "five", "5m3", "1w", True, False, None, [5], -1]
)
def test_bad_durations_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        config.parse_duration(value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**12, "99999999999", "4000d", "\u00b2"])
def test_non_finite_and_absurd_durations_are_rejected(value: object) -> None:
    # TOML allows inf and nan; either would break the refresher's scheduling arithmetic.
    with pytest.raises(ValueError, match=r"10 years|not a duration"):
        config.parse_duration(value)


def test_infinite_interval_in_a_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "inf.toml"
    path.write_text("[refresh]\ninterval = inf\n\n[apps.default]\napp_id = 't'\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [
        f"{path}: refresh.interval: must be a number of seconds of at most 10 years"
    ]


def test_bad_duration_in_a_file_names_the_key() -> None:
    data = minimal_config()
    data["refresh"] = {"interval": "5 minutes"}
    line = one_problem(data)
    assert line.startswith(f"{SOURCE}: refresh.interval: ")
    assert "'5 minutes' is not a duration" in line


def test_zero_duration_is_rejected_where_it_must_be_positive() -> None:
    data = minimal_config()
    data["refresh"] = {"max_stale": 0}
    assert one_problem(data) == f"{SOURCE}: refresh.max_stale: must be greater than zero"


# -- a full file -----------------------------------------------------------------------------


FULL = """
[server]
socket = "/tmp/k.sock"
socket_mode = "0640"
socket_group = "0"
max_body = 4096
request_timeout = "3s"
idle_timeout = 20
max_connections = 10
shutdown_timeout = "2s"
max_connections_per_uid = 5
first_byte_timeout = "1500ms"

[vault]
address = "https://vault.example.com:8200/"
ca_cert = "/etc/ssl/vault-ca.pem"
timeout = "7s"

[vault.auth]
method = "approle"
mount = "approle-keyd"
role_id_file = "/etc/keyd/role-id"
secret_id_file = "/etc/keyd/secret-id"
secret_id_wrapped = true

[refresh]
interval = "1m"
max_stale = "2h"
retry_min = "500ms"
retry_max = "1m"

[apps.default]
app_id = "tLive"
kv_mount = "/kv/"
kv_version = 1
path = "/talkjs/live/"
field = "key"
user_ttl = "2h"
max_user_ttl = "1d"
app_ttl = 10
max_app_ttl = "1m"
webhook_path = "talkjs/webhook"
webhook_field = "whk"
webhook_tolerance = "1m"

[apps."staging.eu-1"]
app_id = "tStaging"

[[grant]]
user = "www-data"
apps = ["default"]
types = ["user", "signature"]
max_ttl = "30m"
user_id_pattern = "^[a-z]+$"
rate = "600/m"

[[grant]]
uid = 0
types = ["user", "app", "webhook"]

[audit]
file = "/tmp/audit.log"
hash_user_ids = true
refusal_burst = 5
refusal_rate = "30/m"
refusal_summary_every = "1m"
max_size = "10M"
keep = 3

[log]
level = "debug"
format = "json"

[metrics]
listen = "127.0.0.1:9464"
"""


def test_every_key_type_is_parsed(tmp_path: Path) -> None:
    file = tmp_path / "keyd.toml"
    file.write_text(FULL)
    cfg = config.load(file)
    assert cfg.source == str(file)
    assert cfg.server == config.ServerConfig(
        socket="/tmp/k.sock",
        socket_mode=0o640,
        socket_group="0",
        max_body=4096,
        request_timeout=3.0,
        idle_timeout=20.0,
        max_connections=10,
        shutdown_timeout=2.0,
        max_connections_per_uid=5,
        first_byte_timeout=1.5,
    )
    assert cfg.vault.address == "https://vault.example.com:8200"  # trailing slash dropped
    assert cfg.vault.ca_cert == "/etc/ssl/vault-ca.pem"
    assert cfg.vault.timeout == 7.0
    assert cfg.vault.auth.method == "approle"
    assert cfg.vault.auth.mount_point == "approle-keyd"
    assert cfg.vault.auth.secret_id_wrapped is True
    assert cfg.refresh == config.RefreshConfig(interval=60.0, max_stale=7200.0, retry_min=0.5, retry_max=60.0)
    live = cfg.apps["default"]
    assert (live.app_id, live.kv_mount, live.kv_version, live.path, live.field) == (
        "tLive",
        "kv",
        1,
        "talkjs/live",
        "key",
    )
    assert (live.user_ttl, live.max_user_ttl, live.app_ttl, live.max_app_ttl) == (7200, 86400, 10, 60)
    assert live.webhook_source == ("talkjs/webhook", "whk")
    assert live.separate_webhook_key
    assert live.webhook_tolerance == 60.0
    staging = cfg.apps["staging.eu-1"]
    assert staging == config.AppConfig(name="staging.eu-1", app_id="tStaging")
    assert not staging.separate_webhook_key
    first, second = cfg.grants
    assert (first.index, first.user, first.apps, first.types, first.max_ttl) == (
        0,
        "www-data",
        ("default",),
        ("user", "signature"),
        1800.0,
    )
    assert first.user_id_pattern is not None and first.user_id_pattern.pattern == "^[a-z]+$"
    assert first.rate == pytest.approx(10.0)
    assert (second.uid, second.apps, second.types) == (0, ("*",), ("user", "app", "webhook"))
    assert cfg.audit == config.AuditConfig(
        file="/tmp/audit.log",
        hash_user_ids=True,
        refusal_burst=5,
        refusal_rate=0.5,
        refusal_summary_every=60.0,
        max_size=10 * 1024 * 1024,
        keep=3,
    )
    assert cfg.log == config.LogConfig(level="debug", format="json")
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert cfg.default_app == "default"


def test_config_is_frozen() -> None:
    cfg = config.parse(minimal_config(), SOURCE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.socket = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.apps["default"].app_id = "tOther"  # type: ignore[misc]


def test_defaults_match_the_documented_contract() -> None:
    cfg = config.parse(minimal_config(), SOURCE)
    assert cfg.server.socket == "/run/keyd/keyd.sock"
    assert cfg.server.socket_mode == 0o660
    assert cfg.server.max_body == 16384
    assert cfg.vault.auth.method == "approle"
    assert cfg.vault.auth.mount_point == "approle"
    assert cfg.refresh.interval == 300.0
    assert cfg.refresh.max_stale == 3600.0
    app = cfg.apps["default"]
    assert (app.kv_mount, app.kv_version, app.path, app.field) == ("secret", 2, "talkjs/live", "secret_key")
    assert (app.user_ttl, app.max_user_ttl, app.app_ttl, app.max_app_ttl) == (3600, 86400, 30, 300)
    assert cfg.grants == ()


# -- problems: one line each, with file and key path ------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sever": {}}, "sever: unknown key; did you mean 'server'?"),
        ({"server": {"sokcet": "/x"}}, "server.sokcet: unknown key; did you mean 'server.socket'?"),
        ({"vault": {"auth": {"metod": "token"}}}, "vault.auth.metod: unknown key; did you mean 'vault.auth.method'?"),
        ({"apps": {"default": {"app_id": "t", "ttl": 5}}}, "apps.default.ttl: unknown key; did you mean 'apps.default.app_ttl'?"),
        ({"grant": [{"types": ["user"], "useer": "x"}]}, "grant[0].useer: unknown key; did you mean 'grant[0].user'?"),
        ({"refresh": {"every": "1m"}}, "refresh.every: unknown key"),
        ({"log": {"colour": True}}, "log.colour: unknown key"),
    ],
)
def test_unknown_keys_are_named_with_file_and_path(data: dict[str, Any], expected: str) -> None:
    merged = {**minimal_config(), **data}
    if "apps" in data:
        merged["apps"] = data["apps"]
    assert one_problem(merged) == f"{SOURCE}: {expected}"


@pytest.mark.parametrize(
    ("section", "key", "value", "text"),
    [
        ("server", "socket", 5, "must be a string, not int"),
        ("server", "socket_mode", True, "is not a file mode"),
        ("server", "socket_mode", "0999", "is not a file mode"),
        ("server", "max_body", "16k", "must be an integer, not str"),
        ("server", "max_body", 0, "must be greater than zero"),
        ("server", "max_connections", 1.5, "must be an integer, not float"),
        ("vault", "address", "vault.example.com", "is not an http:// or https:// URL"),
        ("vault", "timeout", [5], "is not a duration"),
        ("refresh", "interval", True, "duration"),
        ("audit", "max_size", "1T", "is not a size"),
        ("audit", "max_size", -1, "is not a size"),
        ("audit", "keep", 0, "must be greater than zero"),
    ],
)
def test_wrong_types_are_named(section: str, key: str, value: object, text: str) -> None:
    data = minimal_config()
    data[section] = {key: value}
    line = one_problem(data)
    assert line.startswith(f"{SOURCE}: {section}.{key}: "), line
    assert text in line


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("method", "ldap", "'ldap' is not one of token, approle, cert, kubernetes, jwt"),
        ("role", 7, "must be a string, not int"),
        ("jwt_file", ["a"], "must be a string, not list"),
        ("secret_id_wrapped", "yes", "must be true or false, not str"),
        ("role_id_file", 3, "must be a string, not int"),
    ],
)
def test_wrong_auth_values_are_named(key: str, value: object, text: str) -> None:
    data = minimal_config()
    data["vault"] = {"auth": {key: value}}
    assert one_problem(data) == f"{SOURCE}: vault.auth.{key}: {text}"


@pytest.mark.parametrize("method", ["kubernetes", "jwt"])
def test_service_account_logins_need_a_role_and_default_to_the_pod_token(method: str) -> None:
    data = minimal_config()
    data["vault"] = {"auth": {"method": method}}
    assert one_problem(data) == (
        f'{SOURCE}: vault.auth.role: is required when method = "{method}" (the Vault role to log in to)'
    )
    data["vault"] = {"auth": {"method": method, "role": "keyd", "jwt_file": ""}}
    assert (
        one_problem(data)
        == f'{SOURCE}: vault.auth.jwt_file: must name the token file when method = "{method}"'
    )
    data["vault"] = {"auth": {"method": method, "role": "keyd"}}
    auth = config.parse(data, SOURCE).vault.auth
    assert auth.jwt_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert auth.mount_point == method


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("app_id", "", "must not be empty"),
        ("app_id", 7, "must be a string, not int"),
        ("kv_version", 3, "must be 1 or 2"),
        ("kv_version", "2", "must be an integer, not str"),
        ("kv_version", True, "must be an integer, not bool"),
        ("path", "  ", "must not be empty"),
        ("user_ttl", "1 hour", "is not a duration"),
        ("max_app_ttl", -5, "must not be negative"),
    ],
)
def test_wrong_app_values_are_named(key: str, value: object, text: str) -> None:
    line = one_problem(minimal_config(**{key: value}))
    assert line.startswith(f"{SOURCE}: apps.default.{key}: "), line
    assert text in line


@pytest.mark.parametrize("version", [1, 2])
def test_kv_version_one_and_two(version: int) -> None:
    assert config.parse(minimal_config(kv_version=version), SOURCE).apps["default"].kv_version == version


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "server": {"socket_mode": "rw", "extra": 1},
        "vault": {"timeout": "soon"},
        "apps": {"default": {"app_id": "t", "kv_version": 9}},
    }
    assert problems_of(data) == [
        f"{SOURCE}: server.socket_mode: 'rw' is not a file mode (use a string such as \"0660\")",
        f"{SOURCE}: server.extra: unknown key",
        f"{SOURCE}: vault.timeout: 'soon' is not a duration "
        '(use seconds, or a string such as "30s", "5m", "1h", "1d")',
        f"{SOURCE}: apps.default.kv_version: must be 1 or 2",
    ]


@pytest.mark.parametrize(
    ("extra", "key", "maximum"),
    [
        ({"user_ttl": "2d"}, "user_ttl", "max_user_ttl"),
        ({"user_ttl": "2h", "max_user_ttl": "1h"}, "user_ttl", "max_user_ttl"),
        ({"app_ttl": "10m"}, "app_ttl", "max_app_ttl"),
    ],
)
def test_default_ttl_above_its_maximum_is_rejected(extra: dict[str, Any], key: str, maximum: str) -> None:
    assert (
        one_problem(minimal_config(**extra)) == f"{SOURCE}: apps.default.{key}: must not be greater than {maximum}"
    )


def test_ttl_equal_to_its_maximum_is_fine() -> None:
    cfg = config.parse(minimal_config(user_ttl="1d", app_ttl="5m"), SOURCE)
    assert cfg.apps["default"].user_ttl == cfg.apps["default"].max_user_ttl


def test_retry_min_above_retry_max() -> None:
    data = minimal_config()
    data["refresh"] = {"retry_min": "10s", "retry_max": "5s"}
    assert one_problem(data) == f"{SOURCE}: refresh.retry_min: must not be greater than refresh.retry_max"


# -- apps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "live", "eu-1", "a.b_c", "X" * 64])
def test_good_app_names(name: str) -> None:
    cfg = config.parse({"apps": {name: {"app_id": "t"}}}, SOURCE)
    assert list(cfg.apps) == [name]
    assert cfg.default_app == name  # the only app is the default


@pytest.mark.parametrize("name", ["has space", "slash/y", "ümlaut", "X" * 65, "", "quote'"])
def test_bad_app_names(name: str) -> None:
    line = one_problem({"apps": {name: {"app_id": "t"}}})
    assert line == f"{SOURCE}: apps.{name}: app names may hold only letters, digits, '_', '.' and '-'"


def test_app_id_is_required() -> None:
    assert one_problem({"apps": {"default": {}}}) == (
        f"{SOURCE}: apps.default.app_id: is required (your TalkJS app ID)"
    )


def test_at_least_one_app() -> None:
    assert one_problem({}) == f"{SOURCE}: apps: at least one [apps.NAME] table is required"


def test_app_must_be_a_table() -> None:
    assert one_problem({"apps": {"default": "tApp"}}) == (
        f"{SOURCE}: apps.default: must be a table such as [apps.default]"
    )


def test_default_app_choice() -> None:
    two = {"apps": {"live": {"app_id": "a"}, "test": {"app_id": "b"}}}
    assert config.parse(two, SOURCE).default_app is None
    two["apps"]["default"] = {"app_id": "c"}
    assert config.parse(two, SOURCE).default_app == "default"


def test_grant_naming_an_unknown_app() -> None:
    data = minimal_config()
    data["grant"] = [{"apps": ["default", "nope"]}]
    assert one_problem(data) == f"{SOURCE}: grant[0].apps: names app 'nope', which has no [apps.nope] table"


def test_grant_with_an_unknown_type_and_bad_rate() -> None:
    data = minimal_config()
    data["grant"] = [{"types": ["user", "admin"], "rate": "fast"}]
    assert problems_of(data) == [
        f"{SOURCE}: grant[0].types: 'admin' is not one of user, app, signature, webhook, rest",
        f'{SOURCE}: grant[0].rate: \'fast\' is not a rate (use "50/s", "600/m" or "1000/h")',
    ]


# -- socket group ------------------------------------------------------------------------------


def test_socket_group_by_name_number_and_unknown_name() -> None:
    existing = grp.getgrgid(os.getgid()).gr_name
    for value, expected in ((existing, existing), (0, "0"), ("0", "0")):
        data = minimal_config()
        data["server"] = {"socket_group": value}
        assert config.parse(data, SOURCE).server.socket_group == expected
    data = minimal_config()
    data["server"] = {"socket_group": "no-such-group-keyd"}
    assert (
        one_problem(data)
        == f"{SOURCE}: server.socket_group: no group named 'no-such-group-keyd' on this host"
    )


# -- ${VAR} expansion ------------------------------------------------------------------------


def test_env_vars_expand_in_file_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/keyd.service")
    monkeypatch.setenv("KEYD_RUN", "/run/keyd")
    data = minimal_config()
    data["vault"] = {"auth": {"secret_id_file": "${CREDENTIALS_DIRECTORY}/secret-id"}}
    data["server"] = {"socket": "${KEYD_RUN}/keyd.sock"}
    cfg = config.parse(data, SOURCE)
    assert cfg.vault.auth.secret_id_file == "/run/credentials/keyd.service/secret-id"
    assert cfg.server.socket == "/run/keyd/keyd.sock"


def test_unset_env_var_is_an_error_not_an_empty_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYD_UNSET_FOR_TEST", raising=False)
    data = minimal_config()
    data["vault"] = {"auth": {"role_id_file": "${KEYD_UNSET_FOR_TEST}/role-id"}}
    assert one_problem(data) == (
        f"{SOURCE}: vault.auth.role_id_file: refers to ${{KEYD_UNSET_FOR_TEST}}, which is not set in the environment"
    )


def test_dollar_without_braces_is_left_alone() -> None:
    data = minimal_config()
    data["vault"] = {"auth": {"token_file": "/etc/keyd/$HOME/token"}}
    assert config.parse(data, SOURCE).vault.auth.token_file == "/etc/keyd/$HOME/token"


# -- loading files -----------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [f"{path}: file not found"]


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\nsocket = 1\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}: not valid TOML: ")


def test_round_trip_through_the_test_toml_writer(tmp_path: Path) -> None:
    data = minimal_config(kv_version=1, user_ttl="5m")
    data["grant"] = [{"uid": 0, "types": ["user", "app"]}]
    path = tmp_path / "c.toml"
    path.write_text(to_toml(data))
    cfg = config.load(path)
    assert cfg.apps["default"].user_ttl == 300.0
    assert cfg.grants[0].types == ("user", "app")


def test_the_example_config_loads() -> None:
    cfg = config.load(ROOT / "config.example.toml")
    assert "default" in cfg.apps
    assert cfg.default_app == "default"


# -- the files an auth method names (checked on disk by tests/unit/test_config_files.py) ------


def test_cert_method_requires_its_files() -> None:
    data = minimal_config()
    data["vault"] = {"auth": {"method": "cert"}}
    assert problems_of(data) == [
        f'{SOURCE}: vault.auth.client_cert: is required when method = "cert"',
        f'{SOURCE}: vault.auth.client_key: is required when method = "cert"',
    ]


# -- unit and user_unit selectors (sec-peers) -------------------------------------------------


def test_user_unit_needs_a_uid_or_user_in_the_same_grant() -> None:
    data = minimal_config()
    data["grant"] = [{"user_unit": "talkjs-sync.service", "types": ["app"]}]
    problem = one_problem(data)
    assert problem.startswith(f"{SOURCE}: grant[0].user_unit: must be combined with uid or user")
    for who in ({"uid": 1000}, {"user": "sync"}):
        data["grant"] = [{"user_unit": "talkjs-sync.service", "types": ["app"], **who}]
        assert config.parse(data, SOURCE).grants[0].user_unit == "talkjs-sync.service"


@pytest.mark.parametrize("key", ["unit", "user_unit"])
@pytest.mark.parametrize("name", ["talkjs-sync", "system.slice", "x@.service", "a b.service", ""])
def test_unit_selectors_must_name_a_unit_with_processes(key: str, name: str) -> None:
    data = minimal_config()
    data["grant"] = [{key: name, "uid": 1}]
    problem = one_problem(data)
    assert problem.startswith(f"{SOURCE}: grant[0].{key}: ")


def test_identity_cache_is_a_duration() -> None:
    data = minimal_config()
    data["server"] = {"identity_cache": "5s"}
    assert config.parse(data, SOURCE).server.identity_cache == 5.0
    data["server"] = {"identity_cache": "soon"}
    assert one_problem(data).startswith(f"{SOURCE}: server.identity_cache: ")


def test_per_uid_connection_cap_defaults_to_a_quarter_of_a_small_max() -> None:
    data = minimal_config()
    data["server"] = {"max_connections": 10}
    assert config.parse(data, SOURCE).server.max_connections_per_uid == 2
    assert config.parse(minimal_config(), SOURCE).server.max_connections_per_uid == 256
    data["server"] = {"max_connections": 10, "max_connections_per_uid": 11}
    assert one_problem(data) == (
        f"{SOURCE}: server.max_connections_per_uid: must not be greater than server.max_connections"
    )
# -- Vault HA: several addresses ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["address", "addresses"])
def test_vault_nodes_as_a_list_in_order_of_preference(key: str) -> None:
    data = minimal_config()
    data["vault"] = {key: ["https://v1:8200/", "https://v2:8200", " https://v3:8200 "], "probe_interval": "250ms"}
    cfg = config.parse(data, SOURCE)
    assert cfg.vault.nodes == ("https://v1:8200", "https://v2:8200", "https://v3:8200")
    assert cfg.vault.address == "https://v1:8200"  # the first one, for code that wants one address
    assert cfg.vault.probe_interval == 0.25


def test_a_single_address_keeps_working() -> None:
    data = minimal_config()
    data["vault"] = {"address": "https://vault:8200"}
    cfg = config.parse(data, SOURCE)
    assert cfg.vault.nodes == ("https://vault:8200",) and cfg.vault.addresses == ()
    assert cfg.vault.probe_interval == 1.0


@pytest.mark.parametrize(
    ("vault", "expected"),
    [
        ({"address": []}, "vault.address: must name at least one Vault node"),
        ({"addresses": ["https://a:1", "ftp://b"]}, "vault.addresses[1]: 'ftp://b' is not an http:// or https:// URL"),
        ({"addresses": ["https://a:1", 7]}, "vault.addresses[1]: must be a non-empty string"),
        ({"address": ["https://a:1", "https://a:1/"]}, "vault.address[1]: 'https://a:1' is listed twice"),
        ({"address": 8200}, "vault.address: must be a URL or a list of URLs, not int"),
        ({"address": "https://a:1", "addresses": ["https://b:1"]}, "vault.addresses: give either"),
        ({"probe_interval": 0}, "vault.probe_interval: must be greater than zero"),
        ({"address": ["https://a:1", "https://u:pw@b:1"]}, "vault.address[1]: must not hold a user name"),
        ({"address": "http://vault:99999"}, "vault.address: 'http://vault:99999' does not have a valid host"),
        ({"address": "http://[::1"}, "vault.address: 'http://[::1' does not have a valid host"),
        ({"address": "http://" + "a" * 64 + ".x"}, "vault.address: 'http://aaaa"),
    ],
)
def test_bad_vault_node_lists_name_the_file_and_key(vault: dict[str, Any], expected: str) -> None:
    data = minimal_config()
    data["vault"] = vault
    line = one_problem(data)
    assert line.startswith(f"{SOURCE}: {expected}"), line
    assert "pw" not in line  # a password in the URL is not echoed back either


def test_an_unknown_key_names_the_nearest_known_one() -> None:
    data = {
        "vault": {"auth": {"method": "token"}, "adress": "http://x"},
        "apps": {"default": {"app_id": "t", "user_tll": "1h"}},
        "server": {"zzz": 1},
    }
    with pytest.raises(ConfigError) as caught:
        config.parse(data, "x.toml")
    text = str(caught.value)
    assert "x.toml: vault.adress: unknown key; did you mean 'vault.address'?" in text
    assert "x.toml: apps.default.user_tll: unknown key; did you mean 'apps.default.user_ttl'?" in text
    assert "x.toml: server.zzz: unknown key\n" in text + "\n" and "server.zzz: unknown key;" not in text


# -- transit mode ---------------------------------------------------------------------------------


def test_transit_app_reads_its_mount_and_key() -> None:
    cfg = config.parse(minimal_config(key_source="transit", transit_key="talkjs-live"), SOURCE)
    app = cfg.apps["default"]
    assert (app.transit, app.transit_mount, app.transit_key) == (True, "transit", "talkjs-live")
    assert config.parse(minimal_config(), SOURCE).apps["default"].key_source == "kv"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"key_source": "hsm"}, "apps.default.key_source: 'hsm' is not one of kv, transit"),
        ({"key_source": "transit"}, 'apps.default.transit_key: is required when key_source = "transit"'),
        ({"key_source": "transit", "transit_key": "a/b"}, "apps.default.transit_key: must be 1 to 128"),
        ({"transit_key": "talkjs"}, 'apps.default.transit_key: applies only with key_source = "transit"'),
        (
            {"key_source": "transit", "transit_key": "k", "path": "talkjs/live"},
            'apps.default.path: is not used with key_source = "transit"',
        ),
        (
            {"key_source": "transit", "transit_key": "k", "webhook_field": "w"},
            'apps.default.webhook_field: is not used with key_source = "transit"',
        ),
    ],
)
def test_transit_settings_are_checked_with_file_and_key(extra: dict[str, Any], expected: str) -> None:
    problem = one_problem(minimal_config(**extra))
    assert problem.startswith(f"{SOURCE}: {expected}"), problem
