"""Configuration: TOML in, frozen and validated dataclasses out.

Every problem is reported at once, one line each, as ``FILE: key.path: what is wrong`` so an
operator can fix a whole file in one pass. Unknown keys are errors (a typo must not silently fall
back to a default). ``${VAR}`` in file paths is expanded from the environment, so a systemd unit can
point at ``${CREDENTIALS_DIRECTORY}/secret-id``.

Each setting is declared once, as a dataclass field: its name is the TOML key, and
``setting(default, converter)`` gives its default and how its value is read (keyd.config_values).
The ``_read_*`` functions below add only what one field cannot say alone: settings that depend on
each other, required keys, sub-tables. Nothing here touches a file but the TOML file itself; the
files a config names are checked by keyd.config_files.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from keyd import config_values as convert
from keyd.config_values import (
    Reader,
    UserIdPattern,
    parse_duration,
    parse_rate,
    read_settings,
    setting,
)
from keyd.errors import ConfigError

__all__ = [
    "APP_NAME",
    "AUTH_METHODS",
    "JWT_AUTH_METHODS",
    "KEY_SOURCES",
    "REST_METHODS",
    "SERVICE_ACCOUNT_TOKEN",
    "TOKEN_TYPES",
    "AppConfig",
    "AuditConfig",
    "Config",
    "GrantConfig",
    "LogConfig",
    "MetricsConfig",
    "RefreshConfig",
    "RestConfig",
    "RestRule",
    "ServerConfig",
    "UserIdPattern",
    "VaultAuthConfig",
    "VaultConfig",
    "load",
    "parse",
    "parse_duration",
    "parse_rate",
    "parse_rest_rule",
]

APP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOKEN_TYPES = ("user", "app", "signature", "webhook", "rest")
AUTH_METHODS = ("token", "approle", "cert", "kubernetes", "jwt")
# The logins that present a service account (or other workload) JWT read from jwt_file.
JWT_AUTH_METHODS = ("kubernetes", "jwt")
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path
KEY_SOURCES = ("kv", "transit")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket: str = setting("/run/keyd/keyd.sock", convert.nonempty_path)
    socket_mode: int = setting(0o660, convert.mode)
    socket_group: str = setting("", convert.group_or_gid)
    max_body: int = setting(16384, convert.positive_int)
    request_timeout: float = setting(10.0, convert.positive_duration)
    idle_timeout: float = setting(60.0, convert.positive_duration)
    max_connections: int = setting(1024, convert.positive_int)
    shutdown_timeout: float = setting(5.0, convert.positive_duration)
    identity_cache: float = setting(60.0, convert.positive_duration)
    # One uid may hold at most this many connections: another uid is still served while one holds
    # all it can (docs/security.md, "Local adversary"). Unset: at most a quarter of max_connections.
    max_connections_per_uid: int = setting(256, convert.positive_int)
    # ... and a uid whose caller no grant matches (it can only be refused) this many.
    max_connections_without_grant: int = setting(8, convert.positive_int)
    # A fresh connection must send its first request byte within this time.
    first_byte_timeout: float = setting(2.0, convert.positive_duration)


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    method: str = setting("approle", convert.choice(*AUTH_METHODS))
    mount: str = setting("", convert.string)
    token_file: str = setting("", convert.expand)
    role_id_file: str = setting("/etc/keyd/role-id", convert.expand)
    secret_id_file: str = setting("/etc/keyd/secret-id", convert.expand)
    secret_id_wrapped: bool = setting(False, convert.boolean)
    client_cert: str = setting("", convert.expand)
    client_key: str = setting("", convert.expand)
    cert_role: str = setting("", convert.string)
    role: str = setting("", convert.string)
    jwt_file: str = setting(SERVICE_ACCOUNT_TOKEN, convert.expand)

    @property
    def mount_point(self) -> str:
        """The auth mount, defaulting to the method's own name (``approle``, ``kubernetes``...)."""
        return self.mount or self.method


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str = "http://127.0.0.1:8200"  # address and addresses: read by _read_vault
    # Every node of an HA cluster, in order of preference (the first is ``address``); empty when
    # only ``address`` was given.
    addresses: tuple[str, ...] = ()
    ca_cert: str = setting("", convert.expand)
    timeout: float = setting(5.0, convert.positive_duration)
    # How often keyd asks the nodes' unauthenticated sys/health while a key cannot be refreshed or a
    # node is marked failed (jittered down to half of it).
    probe_interval: float = setting(1.0, convert.positive_duration)
    auth: VaultAuthConfig = field(default_factory=VaultAuthConfig)  # [vault.auth]

    @property
    def nodes(self) -> tuple[str, ...]:
        """The Vault nodes keyd may talk to, most preferred first (at least one)."""
        return self.addresses or (self.address,)


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    interval: float = setting(300.0, convert.positive_duration)
    max_stale: float = setting(3600.0, convert.positive_duration)
    retry_min: float = setting(1.0, convert.positive_duration)
    retry_max: float = setting(300.0, convert.positive_duration)


@dataclass(frozen=True, slots=True)
class RestConfig:
    """The REST proxy's upstream for one app (``[apps.NAME.rest]``; used only with ``rest`` grants)."""

    base_url: str = setting("https://api.talkjs.com", convert.https_origin)
    ca_file: str = setting("", convert.expand)
    connect_timeout: float = setting(3.0, convert.positive_duration)
    timeout: float = setting(15.0, convert.positive_duration)
    token_ttl: float = setting(10.0, convert.positive_duration)
    retries: int = setting(2, convert.bounded_int(0, 5))
    retry_backoff: float = setting(0.2, convert.positive_duration)
    max_body: int = setting(1048576, convert.positive_int)
    max_response_body: int = setting(8388608, convert.positive_int)
    max_connections: int = setting(16, convert.positive_int)
    max_concurrent: int = setting(8, convert.positive_int)
    idle_timeout: float = setting(4.0, convert.positive_duration)


_DEFAULT_REST = RestConfig()


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    app_id: str  # required: read by _read_app
    kv_mount: str = setting("secret", convert.vault_path)
    kv_version: int = setting(2, convert.kv_version)
    path: str = setting("talkjs/live", convert.vault_path)
    field: str = setting("secret_key", convert.nonempty)
    webhook_path: str = setting("", convert.optional_vault_path)
    webhook_field: str = setting("", convert.string)
    user_ttl: float = setting(3600.0, convert.positive_duration)
    max_user_ttl: float = setting(86400.0, convert.positive_duration)
    app_ttl: float = setting(30.0, convert.positive_duration)
    max_app_ttl: float = setting(300.0, convert.positive_duration)
    webhook_tolerance: float = setting(300.0, convert.positive_duration)
    rest: RestConfig = _DEFAULT_REST  # [apps.NAME.rest]; immutable, so one shared instance is safe
    # "kv": the key is read from KV into memory; "transit": it stays in Vault.
    key_source: str = setting("kv", convert.choice(*KEY_SOURCES))
    transit_mount: str = setting("transit", convert.vault_path)
    # The Transit key's name (required for key_source = "transit").
    transit_key: str = setting("", convert.transit_key_name)

    @property
    def transit(self) -> bool:
        return self.key_source == "transit"

    @property
    def webhook_source(self) -> tuple[str, str]:
        """(path, field) of the webhook key; the signing key's unless configured otherwise."""
        return (self.webhook_path or self.path, self.webhook_field or self.field)

    @property
    def separate_webhook_key(self) -> bool:
        return self.webhook_source != (self.path, self.field)


REST_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# One path segment as RFC 3986 allows it (pchar), without "%": grant patterns are matched against
# request paths whose segments use the same characters, percent-encodings included.
_REST_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=:@-]+$")


@dataclass(frozen=True, slots=True)
class RestRule:
    """One ``rest`` entry of a grant: ``"PUT /users/*"``; ``*`` is one path segment, ``**`` one or more."""

    method: str
    pattern: str
    regex: re.Pattern[str]

    def __str__(self) -> str:
        return f"{self.method} {self.pattern}"


def parse_rest_rule(value: Any) -> RestRule:
    """``"METHOD /path/pattern"`` -> RestRule; ValueError naming what is wrong."""
    text = convert.string(value)
    method, _, pattern = text.strip().partition(" ")
    pattern = pattern.strip()
    if method not in REST_METHODS:
        raise ValueError(f"{text!r}: the method must be one of {', '.join(REST_METHODS)}")
    if not pattern.startswith("/") or pattern == "/":
        raise ValueError(f"{text!r}: the path must start with / and name a resource, e.g. /users/*")
    parts = []
    for segment in pattern[1:].split("/"):
        if segment == "**":
            parts.append(r"[^/]+(?:/[^/]+)*")
        elif segment == "*":
            parts.append(r"[^/]+")
        elif segment in (".", "..") or not _REST_LITERAL.match(segment) or "*" in segment:
            raise ValueError(
                f"{text!r}: segment {segment!r} must be *, ** or letters, digits and -._~!$&'()+,;=:@"
            )
        else:
            parts.append(re.escape(segment))
    return RestRule(method, pattern, re.compile("/" + "/".join(parts)))


def _token_types(value: Any) -> tuple[str, ...]:
    names = convert.string_list(value)
    for name in names:
        if name not in TOKEN_TYPES:
            raise ValueError(f"{name!r} is not one of {', '.join(TOKEN_TYPES)}")
    return names


def _rest_rules(value: Any) -> tuple[RestRule, ...]:
    return tuple(parse_rest_rule(item) for item in convert.string_list(value))


@dataclass(frozen=True, slots=True)
class GrantConfig:
    index: int
    user: str | None = setting(None, convert.nonempty)
    uid: int | None = setting(None, convert.integer)
    group: str | None = setting(None, convert.nonempty)
    gid: int | None = setting(None, convert.integer)
    unit: str | None = setting(None, convert.unit_name)
    user_unit: str | None = setting(None, convert.unit_name)
    apps: tuple[str, ...] = setting(("*",), convert.string_list)
    types: tuple[str, ...] = setting(("user",), _token_types)
    max_ttl: float | None = setting(None, convert.positive_duration)
    user_id_pattern: UserIdPattern | None = setting(None, convert.user_id_pattern)
    rate: float | None = setting(None, parse_rate)
    rest: tuple[RestRule, ...] = setting((), _rest_rules)


@dataclass(frozen=True, slots=True)
class AuditConfig:
    file: str = setting("", convert.expand)
    hash_user_ids: bool = setting(False, convert.boolean)
    # Refusals are logged line by line up to a burst, then at a rate, per uid and reason; the rest
    # are counted and written as one summary line per uid and reason every refusal_summary_every.
    refusal_burst: int = setting(20, convert.positive_int)
    refusal_rate: float = setting(1.0, parse_rate)
    refusal_summary_every: float = setting(10.0, convert.positive_duration)
    # keyd rotates the file itself when a write takes it to max_size bytes (0: never; leave it to
    # logrotate), keeping audit.log.1 (newest) to audit.log.<keep>.
    max_size: int = setting(100 * 1024 * 1024, convert.size)
    keep: int = setting(5, convert.positive_int)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = setting("info", convert.choice("debug", "info", "warning", "error"))
    format: str = setting("text", convert.choice("text", "json"))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = setting("", convert.loopback_address)
    # A Unix socket of its own for GET /metrics, with a mode and a group.
    socket: str = setting("", convert.optional_path)
    socket_mode: int = setting(0o660, convert.mode)
    socket_group: str = setting("", convert.group_or_gid)


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    server: ServerConfig
    vault: VaultConfig
    refresh: RefreshConfig
    apps: Mapping[str, AppConfig]
    grants: tuple[GrantConfig, ...] = ()
    audit: AuditConfig = field(default_factory=AuditConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def rest_enabled(self) -> bool:
        """Whether any grant may use the REST proxy (only then does ``keyd run`` load it)."""
        return any("rest" in grant.types for grant in self.grants)

    @property
    def default_app(self) -> str | None:
        """The app a request gets when it names none: ``default``, or the only app."""
        if "default" in self.apps:
            return "default"
        if len(self.apps) == 1:
            return next(iter(self.apps))
        return None


# -- reading the sections: what one field cannot say alone ----------------------------------------


def _known_group(r: Reader, name: str, value: str) -> None:
    """A group named (not a gid) must exist on this host."""
    if value and not value.isdigit():
        try:
            grp.getgrnam(value)
        except KeyError:
            r.problem(name, f"no group named {value!r} on this host")


def _read_server(r: Reader) -> ServerConfig:
    cfg = read_settings(r, ServerConfig)
    if "max_connections_per_uid" not in r.table or r.failed("max_connections_per_uid"):
        # Unset: 256, but at most a quarter of max_connections, so one uid never holds them all.
        per_uid = min(ServerConfig().max_connections_per_uid, max(1, cfg.max_connections // 4))
        cfg = replace(cfg, max_connections_per_uid=per_uid)
    elif cfg.max_connections_per_uid > cfg.max_connections:
        r.problem("max_connections_per_uid", "must not be greater than server.max_connections")
    _known_group(r, "socket_group", cfg.socket_group)
    r.finish()
    return cfg


def _vault_nodes(r: Reader, name: str, value: Any) -> list[str]:
    """One URL, or a list of them (an HA cluster's nodes), each checked and named in problems."""
    if isinstance(value, str):
        items, keys = [value], [name]
    elif isinstance(value, list):
        items, keys = value, [f"{name}[{i}]" for i in range(len(value))]
        if not items:
            r.problem(name, "must name at least one Vault node")
    else:
        r.problem(name, f"must be a URL or a list of URLs, not {type(value).__name__}")
        return []
    nodes: list[str] = []
    for key, item in zip(keys, items, strict=True):
        if not isinstance(item, str) or not item.strip():
            r.problem(key, "must be a non-empty string such as \"https://vault-1.example.com:8200\"")
            continue
        if not re.match(r"^https?://[^/\s]+", item.strip()):
            shown = "the value" if "@" in item else repr(item)  # user:password@ is not quoted back
            r.problem(key, f"{shown} is not an http:// or https:// URL")
            continue
        url = item.strip().rstrip("/")
        if "@" in url.partition("://")[2].partition("/")[0]:
            # Vault never takes URL credentials; the address is logged and shown by /v1/health.
            r.problem(key, "must not hold a user name or password (user:password@): Vault never uses them")
            continue
        if not _valid_host_and_port(url):
            r.problem(key, f"{url!r} does not have a valid host name and port")
            continue
        if url in nodes:
            r.problem(key, f"{url!r} is listed twice")
            continue
        nodes.append(url)
    return nodes


def _valid_host_and_port(url: str) -> bool:
    """Whether requests can connect to ``url``: a port of 1-65535 and a host IDNA accepts (labels of
    at most 63 characters), so a bad one is refused here rather than by every call and probe."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
        if not parts.netloc.startswith("[") and host:
            host.encode("idna")
    except (ValueError, UnicodeError):
        return False
    return bool(host) and port != 0


def _read_vault(r: Reader) -> VaultConfig:
    default = VaultConfig().address
    r.seen.update(("address", "addresses"))
    nodes = [default]
    if "address" in r.table and "addresses" in r.table:
        r.problem("addresses", "give either vault.address or vault.addresses, not both")
    elif "addresses" in r.table:
        nodes = _vault_nodes(r, "addresses", r.table["addresses"])
    elif "address" in r.table:
        nodes = _vault_nodes(r, "address", r.table["address"])
    nodes = nodes or [default]
    vault = read_settings(
        r,
        VaultConfig,
        tables={"auth": _read_auth},
        address=nodes[0],
        addresses=tuple(nodes) if len(nodes) > 1 else (),
    )
    r.finish()
    return vault


def _read_auth(r: Reader) -> VaultAuthConfig:
    auth = read_settings(r, VaultAuthConfig)
    if auth.method == "cert":
        for name in ("client_cert", "client_key"):
            if not getattr(auth, name):
                r.problem(name, 'is required when method = "cert"')
    if auth.method in JWT_AUTH_METHODS:
        if not auth.role.strip():
            r.problem("role", f'is required when method = "{auth.method}" (the Vault role to log in to)')
        if not auth.jwt_file:
            r.problem("jwt_file", f'must name the token file when method = "{auth.method}"')
    r.finish()
    return auth


def _read_refresh(r: Reader) -> RefreshConfig:
    cfg = read_settings(r, RefreshConfig)
    if cfg.retry_min > cfg.retry_max:
        r.problem("retry_min", "must not be greater than refresh.retry_max")
    r.finish()
    return cfg


def _read_app(name: str, r: Reader) -> AppConfig:
    if not APP_NAME.match(name):
        r.problems.append(
            f"{r.source}: {r.prefix}: app names may hold only letters, digits, '_', '.' and '-'"
        )
    if "app_id" not in r.table:
        r.problem("app_id", "is required (your TalkJS app ID)")
    app_id = r.get("app_id", "", convert.nonempty)
    app = read_settings(r, AppConfig, tables={"rest": _read_rest}, name=name, app_id=app_id)
    if app.transit and not app.transit_key and not r.failed("transit_key"):
        r.problem("transit_key", 'is required when key_source = "transit" (the Transit key\'s name)')
    if not app.transit and app.transit_key:
        r.problem("transit_key", 'applies only with key_source = "transit"')
    if app.transit:
        for unused in ("kv_mount", "kv_version", "path", "field", "webhook_path", "webhook_field"):
            if unused in r.table:
                r.problem(
                    unused,
                    'is not used with key_source = "transit" (the key and the webhook key are the '
                    "Transit key transit_key); remove it",
                )
    if app.user_ttl > app.max_user_ttl:
        r.problem("user_ttl", "must not be greater than max_user_ttl")
    if app.app_ttl > app.max_app_ttl:
        r.problem("app_ttl", "must not be greater than max_app_ttl")
    r.finish()
    return app


def _read_rest(r: Reader) -> RestConfig:
    cfg = read_settings(r, RestConfig)
    if not 1 <= cfg.token_ttl <= 60 or cfg.token_ttl != int(cfg.token_ttl):
        r.problem("token_ttl", "must be a whole number of seconds from 1 to 60")
    if cfg.connect_timeout > cfg.timeout:
        r.problem("connect_timeout", "must not be greater than timeout")
    r.finish()
    return cfg


def _read_grant(index: int, r: Reader, apps: Mapping[str, AppConfig]) -> GrantConfig:
    grant = read_settings(r, GrantConfig, index=index)
    if grant.rest and "rest" not in grant.types:
        r.problem("rest", 'lists endpoints, but types does not include "rest"')
    if "rest" in grant.types and not grant.rest and "rest" in r.table.get("types", ()):
        r.problem("types", 'includes "rest", but the grant lists no rest endpoints (rest = ["PUT /users/*"])')
    if grant.user_unit is not None and grant.uid is None and grant.user is None:
        r.problem(
            "user_unit",
            "must be combined with uid or user in the same grant: every user names the units of "
            "their own systemd manager freely",
        )
    for app in grant.apps:
        if app != "*" and app not in apps:
            r.problem("apps", f"names app {app!r}, which has no [apps.{app}] table")
    r.finish()
    return grant


def _read_audit(r: Reader) -> AuditConfig:
    cfg = read_settings(r, AuditConfig)
    r.finish()
    return cfg


def _read_log(r: Reader) -> LogConfig:
    cfg = read_settings(r, LogConfig)
    r.finish()
    return cfg


def _read_metrics(r: Reader) -> MetricsConfig:
    cfg = read_settings(r, MetricsConfig)
    if cfg.listen and cfg.socket:
        r.problem("socket", "set either metrics.listen (TCP) or metrics.socket (Unix), not both")
    _known_group(r, "socket_group", cfg.socket_group)
    r.finish()
    return cfg


def parse(data: Mapping[str, Any], source: str) -> Config:
    """Validate parsed TOML; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = Reader(source, problems, "", data)
    server = _read_server(root.sub("server"))
    vault = _read_vault(root.sub("vault"))
    refresh = _read_refresh(root.sub("refresh"))
    apps_reader = root.sub("apps")
    apps: dict[str, AppConfig] = {}
    for name, table in apps_reader.table.items():
        apps_reader.seen.add(name)
        if not isinstance(table, dict):
            apps_reader.problem(name, "must be a table such as [apps.default]")
            continue
        apps[name] = _read_app(name, Reader(source, problems, f"apps.{name}", table))
    if not apps_reader.table:
        problems.append(f"{source}: apps: at least one [apps.NAME] table is required")
    root.seen.add("grant")
    raw_grants = data.get("grant", [])
    grants: list[GrantConfig] = []
    if not isinstance(raw_grants, list):
        root.problem("grant", "must be an array of tables, written [[grant]]")
        raw_grants = []
    for i, table in enumerate(raw_grants):
        if not isinstance(table, dict):
            root.problem(f"grant[{i}]", "must be a table")
            continue
        grants.append(_read_grant(i, Reader(source, problems, f"grant[{i}]", table), apps))
    audit = _read_audit(root.sub("audit"))
    log = _read_log(root.sub("log"))
    metrics = _read_metrics(root.sub("metrics"))
    root.finish()
    if problems:
        raise ConfigError(problems)
    return Config(
        source=source,
        server=server,
        vault=vault,
        refresh=refresh,
        apps=apps,
        grants=tuple(grants),
        audit=audit,
        log=log,
        metrics=metrics,
    )


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except PermissionError:
        raise ConfigError([f"{source}: permission denied"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    return parse(data, source)

