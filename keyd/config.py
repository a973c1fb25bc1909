"""Configuration: TOML in, frozen and validated dataclasses out.

Every problem is reported at once, one line each, as ``FILE: key.path: what is wrong`` so an
operator can fix a whole file in one pass. Unknown keys are errors (a typo must not silently fall
back to a default). ``${VAR}`` in file paths is expanded from the environment, so a systemd unit can
point at ``${CREDENTIALS_DIRECTORY}/secret-id``.
"""

from __future__ import annotations

import difflib
import grp
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import re2

from keyd.errors import ConfigError

T = TypeVar("T")

APP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOKEN_TYPES = ("user", "app", "signature", "webhook", "rest")
AUTH_METHODS = ("token", "approle", "cert", "kubernetes", "jwt")
# The logins that present a service account (or other workload) JWT read from jwt_file.
JWT_AUTH_METHODS = ("kubernetes", "jwt")
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_DURATION = 10 * 365 * 86400.0  # keeps scheduling arithmetic finite


def parse_duration(value: object) -> float:
    """Seconds from an integer, or from a string such as ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30, "30s", "5m", "1h" or "1d"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        if not value <= MAX_DURATION:  # also catches nan and inf, which TOML allows
            raise ValueError("must be a number of seconds of at most 10 years")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            return parse_duration(int(text))
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if text and pos == len(text):
            if total > MAX_DURATION:
                raise ValueError(f"{value!r} is longer than 10 years")
            return total
    raise ValueError(
        f'{value!r} is not a duration (use seconds, or a string such as "30s", "5m", "1h", "1d")'
    )


def parse_rate(value: object) -> float:
    """Requests per second from ``"50/s"``, ``"600/m"`` or ``"1000/h"``."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f'{value!r} is not a rate (use "50/s", "600/m" or "1000/h")')
    return float(match.group(1)) / {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket: str = "/run/keyd/keyd.sock"
    socket_mode: int = 0o660
    socket_group: str = ""
    max_body: int = 16384
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 1024
    shutdown_timeout: float = 5.0
    identity_cache: float = 60.0
    # One uid may hold at most this many connections: another uid is still served while one holds
    # all it can (docs/security.md, "Local adversary").
    max_connections_per_uid: int = 256
    # ... and a uid whose caller no grant matches (it can only be refused) this many.
    max_connections_without_grant: int = 8
    # A fresh connection must send its first request byte within this time.
    first_byte_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    method: str = "approle"
    mount: str = ""
    token_file: str = ""
    role_id_file: str = "/etc/keyd/role-id"
    secret_id_file: str = "/etc/keyd/secret-id"  # noqa: S105 - a path, not a secret
    secret_id_wrapped: bool = False
    client_cert: str = ""
    client_key: str = ""
    cert_role: str = ""
    role: str = ""
    jwt_file: str = SERVICE_ACCOUNT_TOKEN

    @property
    def mount_point(self) -> str:
        """The auth mount, defaulting to the method's own name (``approle``, ``kubernetes``...)."""
        return self.mount or self.method


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str = "http://127.0.0.1:8200"
    ca_cert: str = ""
    timeout: float = 5.0
    auth: VaultAuthConfig = field(default_factory=VaultAuthConfig)
    # Every node of an HA cluster, in order of preference (the first is ``address``); empty when
    # only ``address`` was given.
    addresses: tuple[str, ...] = ()
    # How often keyd asks the nodes' unauthenticated sys/health while a key cannot be refreshed or a
    # node is marked failed (jittered down to half of it).
    probe_interval: float = 1.0

    @property
    def nodes(self) -> tuple[str, ...]:
        """The Vault nodes keyd may talk to, most preferred first (at least one)."""
        return self.addresses or (self.address,)


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    interval: float = 300.0
    max_stale: float = 3600.0
    retry_min: float = 1.0
    retry_max: float = 300.0


@dataclass(frozen=True, slots=True)
class RestConfig:
    """The REST proxy's upstream for one app (``[apps.NAME.rest]``; used only with ``rest`` grants)."""

    base_url: str = "https://api.talkjs.com"
    ca_file: str = ""
    connect_timeout: float = 3.0
    timeout: float = 15.0
    token_ttl: float = 10.0
    retries: int = 2
    retry_backoff: float = 0.2
    max_body: int = 1048576
    max_response_body: int = 8388608
    max_connections: int = 16
    max_concurrent: int = 8
    idle_timeout: float = 4.0


_DEFAULT_REST = RestConfig()


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    app_id: str
    kv_mount: str = "secret"
    kv_version: int = 2
    path: str = "talkjs/live"
    field: str = "secret_key"
    webhook_path: str = ""
    webhook_field: str = ""
    user_ttl: float = 3600.0
    max_user_ttl: float = 86400.0
    app_ttl: float = 30.0
    max_app_ttl: float = 300.0
    webhook_tolerance: float = 300.0
    rest: RestConfig = _DEFAULT_REST  # immutable, so one shared instance is safe
    key_source: str = "kv"  # "kv": the key is read from KV into memory; "transit": it stays in Vault
    transit_mount: str = "transit"
    transit_key: str = ""  # the Transit key's name (required for key_source = "transit")

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


KEY_SOURCES = ("kv", "transit")
_TRANSIT_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _transit_key_name(value: Any) -> str:
    name = _string(value)
    if name and not _TRANSIT_KEY.match(name):
        raise ValueError("must be 1 to 128 letters, digits, '_', '.' or '-' (a Transit key name)")
    return name


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
    text = _string(value)
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


@dataclass(frozen=True, slots=True)
class GrantConfig:
    index: int
    user: str | None = None
    uid: int | None = None
    group: str | None = None
    gid: int | None = None
    unit: str | None = None
    user_unit: str | None = None
    apps: tuple[str, ...] = ("*",)
    types: tuple[str, ...] = ("user",)
    max_ttl: float | None = None
    user_id_pattern: UserIdPattern | None = None
    rate: float | None = None
    rest: tuple[RestRule, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditConfig:
    file: str = ""
    hash_user_ids: bool = False
    # Refusals are logged line by line up to a burst, then at a rate, per uid and reason; the rest
    # are counted and written as one summary line per uid and reason every refusal_summary_every.
    refusal_burst: int = 20
    refusal_rate: float = 1.0
    refusal_summary_every: float = 10.0
    # keyd rotates the file itself when a write takes it to max_size bytes (0: never; leave it to
    # logrotate), keeping audit.log.1 (newest) to audit.log.<keep>.
    max_size: int = 100 * 1024 * 1024
    keep: int = 5


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = ""
    socket: str = ""  # a Unix socket of its own for GET /metrics, with a mode and a group
    socket_mode: int = 0o660
    socket_group: str = ""


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


class _Reader:
    """Walks one TOML table, records problems with their full key path, rejects unknown keys."""

    def __init__(self, source: str, problems: list[str], prefix: str, table: Mapping[str, Any]):
        self.source = source
        self.problems = problems
        self.prefix = prefix
        self.table = table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, text: str) -> None:
        self.problems.append(f"{self.source}: {self.key(name)}: {text}")

    def get(self, name: str, default: T, convert: Callable[[Any], T]) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        try:
            return convert(self.table[name])
        except (ValueError, TypeError) as exc:
            self.problem(name, str(exc))
            return default

    def failed(self, name: str) -> bool:
        """Whether a problem was already recorded for ``name`` (so one mistake gives one line)."""
        prefix = f"{self.source}: {self.key(name)}:"
        return any(problem.startswith(prefix) for problem in self.problems)

    def sub(self, name: str) -> _Reader:
        self.seen.add(name)
        value = self.table.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, "must be a table")
            value = {}
        return _Reader(self.source, self.problems, self.key(name), value)

    def finish(self) -> None:
        """Every key this table holds that nothing read is unknown: say so, with the nearest known
        key when one is close ("did you mean"). Call after reading every key of the table."""
        known = sorted(self.seen)
        for name in self.table:
            if name not in self.seen:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"; did you mean {self.key(close[0])!r}?" if close else ""
                self.problem(name, f"unknown key{hint}")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {type(value).__name__}")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, not {type(value).__name__}")
    return value


def _positive_int(value: Any) -> int:
    number = _int(value)
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


_SIZE = re.compile(r"(\d+)\s*([KMG]?)", re.IGNORECASE)


def _size(value: Any) -> int:
    """A size in bytes: an integer, or a string such as "100M", "512K", "1G" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return int(value)
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'{value!r} is not a size (use bytes or a string such as "100M", "1G"; 0 = off)')
    power: int = " KMG".index(match[2].upper() or " ")
    return int(match[1]) << (10 * power)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _mode(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return int(value.strip(), 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError(f'{value!r} is not a file mode (use a string such as "0660")')


def _choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _string(value)
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text

    return convert


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("must be a list of strings")
    return tuple(value)


def _expand(value: Any) -> str:
    """A file path with ``${VAR}`` expanded; an unset variable is an error, not an empty string."""
    text = _string(value)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"refers to ${{{name}}}, which is not set in the environment")
        return os.environ[name]

    return _ENV_REF.sub(replace, text)


class UserIdPattern(Protocol):
    """A grant's ``user_id_pattern``: RE2 (linear in the user id's length), or re in unit tests."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> object | None: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the ValueError below says it, naming the file and the grant


def _pattern(value: Any) -> UserIdPattern:
    """RE2, not Python's re: matching takes time linear in the user id whatever the pattern, so
    an operator's ``^(a+)+$`` cannot let one crafted user_id stall the event loop for every caller.
    RE2 has no backreferences or lookaround (refused here), and its \\w, \\d, \\s are ASCII."""
    text = _nonempty(value)
    try:
        compiled: UserIdPattern = re2.compile(text, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(
            f"is not a pattern keyd can match in linear time (RE2 syntax: no backreferences or "
            f"lookaround): {reason}"
        ) from None
    return compiled


def _read_server(r: _Reader) -> ServerConfig:
    d = ServerConfig()
    cfg = ServerConfig(
        socket=r.get("socket", d.socket, lambda v: _expand(_nonempty(v))),
        socket_mode=r.get("socket_mode", d.socket_mode, _mode),
        socket_group=r.get(
            "socket_group", d.socket_group, lambda v: str(_int(v)) if isinstance(v, int) else _string(v)
        ),
        max_body=r.get("max_body", d.max_body, _positive_int),
        request_timeout=r.get("request_timeout", d.request_timeout, _positive_duration),
        idle_timeout=r.get("idle_timeout", d.idle_timeout, _positive_duration),
        max_connections=r.get("max_connections", d.max_connections, _positive_int),
        shutdown_timeout=r.get("shutdown_timeout", d.shutdown_timeout, _positive_duration),
        identity_cache=r.get("identity_cache", d.identity_cache, _positive_duration),
        max_connections_per_uid=r.get("max_connections_per_uid", 0, _positive_int),
        max_connections_without_grant=r.get(
            "max_connections_without_grant", d.max_connections_without_grant, _positive_int
        ),
        first_byte_timeout=r.get("first_byte_timeout", d.first_byte_timeout, _positive_duration),
    )
    if not cfg.max_connections_per_uid:
        # Unset: 256, but at most a quarter of max_connections, so one uid never holds them all.
        per_uid = min(d.max_connections_per_uid, max(1, cfg.max_connections // 4))
        cfg = replace(cfg, max_connections_per_uid=per_uid)
    elif cfg.max_connections_per_uid > cfg.max_connections:
        r.problem("max_connections_per_uid", "must not be greater than server.max_connections")
    if cfg.socket_group and not cfg.socket_group.isdigit():
        try:
            grp.getgrnam(cfg.socket_group)
        except KeyError:
            r.problem("socket_group", f"no group named {cfg.socket_group!r} on this host")
    r.finish()
    return cfg


def _vault_nodes(r: _Reader, name: str, value: Any) -> list[str]:
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


def _read_vault(r: _Reader) -> VaultConfig:
    d = VaultConfig()
    r.seen.update(("address", "addresses"))
    nodes = [d.address]
    if "address" in r.table and "addresses" in r.table:
        r.problem("addresses", "give either vault.address or vault.addresses, not both")
    elif "addresses" in r.table:
        nodes = _vault_nodes(r, "addresses", r.table["addresses"])
    elif "address" in r.table:
        nodes = _vault_nodes(r, "address", r.table["address"])
    nodes = nodes or [d.address]
    vault = VaultConfig(
        address=nodes[0],
        addresses=tuple(nodes) if len(nodes) > 1 else (),
        ca_cert=r.get("ca_cert", d.ca_cert, _expand),
        timeout=r.get("timeout", d.timeout, _positive_duration),
        probe_interval=r.get("probe_interval", d.probe_interval, _positive_duration),
        auth=_read_auth(r.sub("auth")),
    )
    r.finish()
    return vault


def _read_auth(r: _Reader) -> VaultAuthConfig:
    d = VaultAuthConfig()
    auth = VaultAuthConfig(
        method=r.get("method", d.method, _choice(*AUTH_METHODS)),
        mount=r.get("mount", d.mount, _string),
        token_file=r.get("token_file", d.token_file, _expand),
        role_id_file=r.get("role_id_file", d.role_id_file, _expand),
        secret_id_file=r.get("secret_id_file", d.secret_id_file, _expand),
        secret_id_wrapped=r.get("secret_id_wrapped", d.secret_id_wrapped, _bool),
        client_cert=r.get("client_cert", d.client_cert, _expand),
        client_key=r.get("client_key", d.client_key, _expand),
        cert_role=r.get("cert_role", d.cert_role, _string),
        role=r.get("role", d.role, _string),
        jwt_file=r.get("jwt_file", d.jwt_file, _expand),
    )
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


def _read_refresh(r: _Reader) -> RefreshConfig:
    d = RefreshConfig()
    cfg = RefreshConfig(
        interval=r.get("interval", d.interval, _positive_duration),
        max_stale=r.get("max_stale", d.max_stale, _positive_duration),
        retry_min=r.get("retry_min", d.retry_min, _positive_duration),
        retry_max=r.get("retry_max", d.retry_max, _positive_duration),
    )
    if cfg.retry_min > cfg.retry_max:
        r.problem("retry_min", "must not be greater than refresh.retry_max")
    r.finish()
    return cfg


def _read_app(name: str, r: _Reader) -> AppConfig:
    d = AppConfig(name=name, app_id="")
    if not APP_NAME.match(name):
        r.problems.append(
            f"{r.source}: {r.prefix}: app names may hold only letters, digits, '_', '.' and '-'"
        )
    if "app_id" not in r.table:
        r.problem("app_id", "is required (your TalkJS app ID)")
    app = AppConfig(
        name=name,
        app_id=r.get("app_id", "", _nonempty),
        kv_mount=r.get("kv_mount", d.kv_mount, lambda v: _nonempty(v).strip("/")),
        kv_version=r.get("kv_version", d.kv_version, _kv_version),
        path=r.get("path", d.path, lambda v: _nonempty(v).strip("/")),
        field=r.get("field", d.field, _nonempty),
        webhook_path=r.get("webhook_path", d.webhook_path, lambda v: _string(v).strip("/")),
        webhook_field=r.get("webhook_field", d.webhook_field, _string),
        user_ttl=r.get("user_ttl", d.user_ttl, _positive_duration),
        max_user_ttl=r.get("max_user_ttl", d.max_user_ttl, _positive_duration),
        app_ttl=r.get("app_ttl", d.app_ttl, _positive_duration),
        max_app_ttl=r.get("max_app_ttl", d.max_app_ttl, _positive_duration),
        webhook_tolerance=r.get("webhook_tolerance", d.webhook_tolerance, _positive_duration),
        rest=_read_rest(r.sub("rest")),
        key_source=r.get("key_source", d.key_source, _choice(*KEY_SOURCES)),
        transit_mount=r.get("transit_mount", d.transit_mount, lambda v: _nonempty(v).strip("/")),
        transit_key=r.get("transit_key", d.transit_key, _transit_key_name),
    )
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


def _read_rest(r: _Reader) -> RestConfig:
    d = RestConfig()
    base_url = r.get("base_url", d.base_url, _nonempty).rstrip("/")
    if not re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d{1,5})?", base_url):
        # Not quoted back when it holds an "@": that part may be a password.
        shown = "the value" if "@" in base_url else repr(base_url)
        r.problem("base_url", f"{shown} must be https://HOST or https://HOST:PORT, with no path")
    cfg = RestConfig(
        base_url=base_url,
        ca_file=r.get("ca_file", d.ca_file, _expand),
        connect_timeout=r.get("connect_timeout", d.connect_timeout, _positive_duration),
        timeout=r.get("timeout", d.timeout, _positive_duration),
        token_ttl=r.get("token_ttl", d.token_ttl, _positive_duration),
        retries=r.get("retries", d.retries, _bounded_int(0, 5)),
        retry_backoff=r.get("retry_backoff", d.retry_backoff, _positive_duration),
        max_body=r.get("max_body", d.max_body, _positive_int),
        max_response_body=r.get("max_response_body", d.max_response_body, _positive_int),
        max_connections=r.get("max_connections", d.max_connections, _positive_int),
        max_concurrent=r.get("max_concurrent", d.max_concurrent, _positive_int),
        idle_timeout=r.get("idle_timeout", d.idle_timeout, _positive_duration),
    )
    if not 1 <= cfg.token_ttl <= 60 or cfg.token_ttl != int(cfg.token_ttl):
        r.problem("token_ttl", "must be a whole number of seconds from 1 to 60")
    if cfg.connect_timeout > cfg.timeout:
        r.problem("connect_timeout", "must not be greater than timeout")
    r.finish()
    return cfg


def _bounded_int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}")
        return number

    return convert


def _kv_version(value: Any) -> int:
    version = _int(value)
    if version not in (1, 2):
        raise ValueError("must be 1 or 2")
    return version


def _read_grant(index: int, r: _Reader, apps: Mapping[str, AppConfig]) -> GrantConfig:
    def types(value: Any) -> tuple[str, ...]:
        names = _string_list(value)
        for name in names:
            if name not in TOKEN_TYPES:
                raise ValueError(f"{name!r} is not one of {', '.join(TOKEN_TYPES)}")
        return names

    grant = GrantConfig(
        index=index,
        user=r.get("user", None, _nonempty),
        uid=r.get("uid", None, _int),
        group=r.get("group", None, _nonempty),
        gid=r.get("gid", None, _int),
        unit=r.get("unit", None, _unit_name),
        user_unit=r.get("user_unit", None, _unit_name),
        apps=r.get("apps", ("*",), _string_list),
        types=r.get("types", ("user",), types),
        max_ttl=r.get("max_ttl", None, _positive_duration),
        user_id_pattern=r.get("user_id_pattern", None, _pattern),
        rate=r.get("rate", None, parse_rate),
        rest=r.get("rest", (), lambda v: tuple(parse_rest_rule(x) for x in _string_list(v))),
    )
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


_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]+)?\.(?:service|scope|socket|mount|swap)$")


def _unit_name(value: Any) -> str:
    name = _nonempty(value)
    if len(name) > 255 or not _UNIT_NAME.match(name):
        raise ValueError(
            f"{name!r} is not the name of a systemd unit that runs processes "
            "(such as php-fpm.service, talkjs-sync.service or session-1.scope)"
        )
    return name


def _read_audit(r: _Reader) -> AuditConfig:
    d = AuditConfig()
    cfg = AuditConfig(
        file=r.get("file", d.file, _expand),
        hash_user_ids=r.get("hash_user_ids", d.hash_user_ids, _bool),
        refusal_burst=r.get("refusal_burst", d.refusal_burst, _positive_int),
        refusal_rate=r.get("refusal_rate", d.refusal_rate, parse_rate),
        refusal_summary_every=r.get("refusal_summary_every", d.refusal_summary_every, _positive_duration),
        max_size=r.get("max_size", d.max_size, _size),
        keep=r.get("keep", d.keep, _positive_int),
    )
    r.finish()
    return cfg


def _read_log(r: _Reader) -> LogConfig:
    d = LogConfig()
    cfg = LogConfig(
        level=r.get("level", d.level, _choice("debug", "info", "warning", "error")),
        format=r.get("format", d.format, _choice("text", "json")),
    )
    r.finish()
    return cfg


def _listen(value: Any) -> str:
    text = _string(value)
    if text and not re.fullmatch(r"(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d{1,5}", text):
        raise ValueError(f'{text!r} is not a loopback address such as "127.0.0.1:9464"')
    return text


def _read_metrics(r: _Reader) -> MetricsConfig:
    d = MetricsConfig()
    cfg = MetricsConfig(
        listen=r.get("listen", "", _listen),
        socket=r.get("socket", "", lambda v: _expand(_string(v)) if v else ""),
        socket_mode=r.get("socket_mode", d.socket_mode, _mode),
        socket_group=r.get(
            "socket_group", d.socket_group, lambda v: str(_int(v)) if isinstance(v, int) else _string(v)
        ),
    )
    if cfg.listen and cfg.socket:
        r.problem("socket", "set either metrics.listen (TCP) or metrics.socket (Unix), not both")
    if cfg.socket_group and not cfg.socket_group.isdigit():
        try:
            grp.getgrnam(cfg.socket_group)
        except KeyError:
            r.problem("socket_group", f"no group named {cfg.socket_group!r} on this host")
    r.finish()
    return cfg


def parse(data: Mapping[str, Any], source: str) -> Config:
    """Validate parsed TOML; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = _Reader(source, problems, "", data)
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
        apps[name] = _read_app(name, _Reader(source, problems, f"apps.{name}", table))
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
        grants.append(_read_grant(i, _Reader(source, problems, f"grant[{i}]", table), apps))
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

