"""The command line: the only place that prints usage, maps errors to messages, and exits.

Exit codes: 0 success, 1 a request or the daemon failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import stat
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from keyd import __version__, config_files
from keyd import config as configuration
from keyd.errors import ClientError, ConfigError, KeydError, StartupError

if TYPE_CHECKING:
    from keyd.bench import options as bench

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

DEFAULT_CONFIG = "/etc/keyd/config.toml"


LOCAL_SOCKET = "run/keyd.sock"  # where `keyd dev` serves, relative to the current directory
SYSTEM_SOCKET = "/run/keyd/keyd.sock"
SOCKET_HELP = f"keyd socket (default: $KEYD_SOCKET, else ./{LOCAL_SOCKET} if yours, else {SYSTEM_SOCKET})"


def socket_path(given: str | None) -> str:
    """--socket, else $KEYD_SOCKET, else ./run/keyd.sock when it is trusted, else the system socket.

    A socket found in the current directory is used only when it and its directory belong to the
    invoking user or root (and are no symlinks, the directory not writable by everyone): anyone who
    can write there could plant a socket that collects the request. Otherwise ClientError says so.
    """
    if given:
        return given
    if os.environ.get("KEYD_SOCKET"):
        return os.environ["KEYD_SOCKET"]
    directory = os.path.dirname(LOCAL_SOCKET)
    try:
        dir_st, sock_st = os.lstat(directory), os.lstat(LOCAL_SOCKET)
    except OSError:
        return SYSTEM_SOCKET
    trusted = {os.geteuid(), 0}
    why = None
    if stat.S_ISLNK(dir_st.st_mode) or stat.S_ISLNK(sock_st.st_mode):
        why = "it, or ./run, is a symbolic link"
    elif dir_st.st_uid not in trusted:
        why = f"./{directory} belongs to {_owner(dir_st.st_uid)}, not to you or root"
    elif dir_st.st_mode & 0o002 and not dir_st.st_mode & stat.S_ISVTX:
        why = f"./{directory} is writable by every user"
    elif not stat.S_ISSOCK(sock_st.st_mode):
        why = "it is not a socket"
    elif sock_st.st_uid not in trusted:
        why = f"it belongs to {_owner(sock_st.st_uid)}, not to you or root"
    if why is None:
        return LOCAL_SOCKET
    raise ClientError(
        0,
        "untrusted_socket",
        f"not using ./{LOCAL_SOCKET}: {why}, so it may have been planted to collect your request; "
        "name the socket with --socket PATH or KEYD_SOCKET",
    )


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _err(message: str) -> None:
    print(f"keyd: {message}", file=sys.stderr)


def _load_checked(path: str) -> configuration.Config:
    """The config at ``path``, with every file it names present (ConfigError otherwise)."""
    config = configuration.load(path)
    problems = config_files.missing_files(config)
    if problems:
        raise ConfigError(problems)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from keyd import logs  # noqa: PLC0415 - keep light commands light
    from keyd.daemon import wiring as daemon  # noqa: PLC0415 - keep light commands light

    config = _load_checked(args.config)
    logs.setup(config.log.level, config.log.format)
    daemon.run(config)
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from keyd import logs  # noqa: PLC0415 - keep light commands light
    from keyd.ops import dev  # noqa: PLC0415

    logs.setup("info", "text")
    if bool(args.key_file) != bool(args.app_id):
        _err("--app-id and --key-file go together: your TalkJS test app's id and its secret key")
        return EXIT_CONFIG
    key = dev.read_test_key(args.key_file) if args.key_file else None
    with contextlib.suppress(KeyboardInterrupt):
        dev.run_dev(args.socket, app_id=args.app_id or dev.DEMO_APP_ID, key=key)
    return EXIT_OK


# What ${CREDENTIALS_DIRECTORY} stands for outside systemd when nobody says: the directory systemd
# gives keyd.service. Files under it cannot be checked from a shell (they exist only while keyd runs).
SYSTEMD_CREDENTIALS_DIR = "/run/credentials/keyd.service"


def _credentials_placeholder() -> str | None:
    """Set ${CREDENTIALS_DIRECTORY} to systemd's path for keyd.service when it is unset (outside
    systemd); returns that path, or None when the environment already had one."""
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        return None
    os.environ["CREDENTIALS_DIRECTORY"] = SYSTEMD_CREDENTIALS_DIR
    return SYSTEMD_CREDENTIALS_DIR


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.credentials_dir:
        os.environ["CREDENTIALS_DIRECTORY"] = args.credentials_dir
    placeholder = _credentials_placeholder()
    config = configuration.load(args.config)
    encrypted = config_files.encrypted_credentials(config, args.credentials_dir) if args.credentials_dir else {}
    problems = config_files.missing_files(config, skip=frozenset(encrypted))
    unchecked = [p for p in problems if placeholder and f"file '{placeholder}/" in p]
    problems = [p for p in problems if p not in unchecked]
    if args.credentials_dir:
        problems += config_files.credential_mode_problems(config, args.credentials_dir, encrypted)
    if problems:
        raise ConfigError(problems)
    from keyd.ops import grants  # noqa: PLC0415

    for line in [*grants.warnings(config), *grants.rest_warnings(config)]:  # risky but valid: exit 0
        print(line, file=sys.stderr)
    for line in unchecked:
        key = line.split(": ")[1]
        print(
            f"{config.source}: {key}: not checked here (${{CREDENTIALS_DIRECTORY}} is set by systemd "
            "when keyd runs; add --credentials-dir /etc/keyd to check the files LoadCredential= reads)",
            file=sys.stderr,
        )
    for key, file in encrypted.items():
        print(
            f"{config.source}: {key}: encrypted credential {file} (LoadCredentialEncrypted=): "
            "present and closed to other users; only systemd decrypts it, at keyd's start",
            file=sys.stderr,
        )
    print(f"{args.config}: ok ({len(config.apps)} app(s): {', '.join(config.apps)})")
    return EXIT_OK


def cmd_grants(args: argparse.Namespace) -> int:
    from keyd.ops import grants  # noqa: PLC0415

    _credentials_placeholder()  # grants never reads credential files, only names them
    config = configuration.load(args.config)
    caller = grants.caller_for(uid=args.uid, user=args.user, unit=args.unit, user_unit=args.user_unit)
    matched, lines = grants.explain(config, caller)
    print("\n".join(lines))
    return EXIT_OK if matched else EXIT_FAILED


def cmd_token(args: argparse.Namespace) -> int:
    from keyd.client import KeydClient  # noqa: PLC0415

    if args.app_token == bool(args.user_id):
        _err("give exactly one of --user-id ID or --app-token")
        return EXIT_CONFIG
    with KeydClient(socket_path(args.socket)) as client:
        if args.app_token:
            result = client.token(type="app", ttl=args.ttl, app=args.app)
        else:
            result = client.token(user_id=args.user_id, ttl=args.ttl, app=args.app)
    print(json.dumps(result, indent=2) if args.json else result["token"])
    return EXIT_OK


def cmd_vault_setup(args: argparse.Namespace) -> int:
    from keyd.ops import vault_setup  # noqa: PLC0415 - imports hvac only when used

    return vault_setup.main(args)


def cmd_health(args: argparse.Namespace) -> int:
    from keyd.client import KeydClient  # noqa: PLC0415

    with KeydClient(socket_path(args.socket)) as client:
        status, doc = client.health()
    print(json.dumps(doc, indent=2))
    if args.live:  # a liveness probe: keyd answers; a Vault outage is no reason to restart it
        return EXIT_OK
    return EXIT_OK if status == 200 else EXIT_FAILED


def cmd_reload(args: argparse.Namespace) -> int:
    from keyd.ops import reload  # noqa: PLC0415

    try:
        path = socket_path(args.socket)
    except ClientError as exc:
        _err(exc.message)
        return reload.EXIT_UNREACHABLE
    return reload.reload(path, args.pid, args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    from keyd.ops import status  # noqa: PLC0415

    colour = not args.json and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    try:
        path = socket_path(args.socket)
    except ClientError as exc:  # an untrusted ./run/keyd.sock: unreachable, as far as we are concerned
        if args.json:
            print(json.dumps({"status": "unreachable", "socket": LOCAL_SOCKET, "error": exc.message}))
        else:
            _err(exc.message)
        return status.EXIT_UNREACHABLE
    summary = status.summarize(path, as_json=args.json, colour=colour)
    print(summary.text)
    return summary.exit_code


def bench_options(args: argparse.Namespace) -> bench.Options:
    """`keyd bench`'s parsed arguments as bench.Options."""
    from keyd.bench import options as bench  # noqa: PLC0415 - never imported by `keyd run` (keeps its RSS down)

    return bench.Options(
        socket=args.socket,
        concurrency=args.concurrency,
        requests=args.requests,
        duration=args.duration,
        kind=args.type,
        json=args.json,
        compare=args.compare,
        vault_address=args.vault_address,
        memory=args.memory,
        startup=args.startup,
        inprocess=args.inprocess,
        warmup=args.warmup,
        rest=args.rest,
        scale=args.scale,
        plot=args.plot,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from keyd.bench import command  # noqa: PLC0415 - see bench_options

    _, clean = command.run(bench_options(args))
    return EXIT_OK if clean else EXIT_FAILED


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


def _duration(value: str) -> float:
    try:
        seconds = configuration.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return seconds


def _any_duration(value: str) -> float:
    """A duration that may be zero (`keyd vault setup --secret-id-ttl 0`: unlimited)."""
    try:
        return configuration.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vault_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `keyd vault setup`, here rather than in keyd.ops.vault_setup: every command
    builds the whole parser, and `keyd run` must not import an operator module to do it."""
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="keyd's config file")
    parser.add_argument("--role", default="keyd", help="AppRole (or cert) role name (default keyd)")
    parser.add_argument("--policy", default="keyd", help="policy name (default keyd)")
    parser.add_argument(
        "--token-ttl", type=_any_duration, default=3600.0, help="keyd's token TTL (default 1h)"
    )
    parser.add_argument(
        "--token-max-ttl",
        type=_any_duration,
        default=86400.0,
        help="its max TTL, then keyd logs in again (24h)",
    )
    parser.add_argument(
        "--secret-id-ttl",
        type=_any_duration,
        default=30 * 86400.0,
        help="secret_id lifetime; 0 = unlimited (30d)",
    )
    parser.add_argument(
        "--cidr",
        action="append",
        default=[],
        help="bind the secret_id and tokens to this CIDR (repeatable), e.g. 10.0.3.7/32",
    )
    parser.add_argument(
        "--wrap-ttl",
        type=_any_duration,
        help="response-wrap the secret_id for this long (needs vault.auth.secret_id_wrapped = true; "
        "default 60s when that is set)",
    )
    parser.add_argument(
        "--new-secret-id", action="store_true", help="issue a fresh secret_id even if the file's is valid"
    )
    parser.add_argument(
        "--store-key", metavar="APP", help="store the TalkJS secret key read from standard input for APP"
    )
    parser.add_argument(
        "--client-ca", default="", help='method = "cert": PEM CA that signs keyd\'s client certificates'
    )
    parser.add_argument(
        "--service-account",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help='method = "kubernetes" or "jwt": the service account keyd\'s role is bound to (repeatable)',
    )
    parser.add_argument("--audience", default="vault", help='method = "jwt": the bound audience (vault)')
    parser.add_argument("--kubernetes-host", default="", help="Kubernetes auth: write the mount's API URL")
    parser.add_argument("--kubernetes-ca", default="", help="Kubernetes auth: PEM CA of that API")
    parser.add_argument(
        "--jwt-pubkey", action="append", default=[], help="JWT auth: write the issuer's PEM public key(s)"
    )
    parser.add_argument("--jwt-issuer", default="", help="JWT auth: the bound issuer (iss)")
    parser.add_argument(
        "--credentials-dir",
        default="/etc/keyd",
        help="what ${CREDENTIALS_DIRECTORY} in the config means when it is not set (default /etc/keyd, "
        "where keyd.service's LoadCredential= reads from)",
    )
    parser.add_argument(
        "--print-policy", action="store_true", help="print the policy for the config and exit (no Vault)"
    )
    parser.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="URL",
        help="a Vault node to use instead of the config's vault.address list (repeatable, in order "
        "of preference; the next one is tried when a node cannot serve)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyd",
        description="Keeps the TalkJS secret key in Vault and in memory; signs tokens over a Unix socket.",
    )
    parser.add_argument("--version", action="version", version=f"keyd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "run the daemon")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")

    p = add("dev", cmd_dev, "run keyd on an embedded OpenBao dev server with a demo key")
    p.add_argument("--socket", default=LOCAL_SOCKET, help=f"socket path (default {LOCAL_SOCKET})")
    p.add_argument("--app-id", default="", help="your TalkJS test app's id (with --key-file)")
    p.add_argument(
        "--key-file",
        metavar="FILE",
        default="",
        help="your test app's secret key from FILE, or - for standard input (never on the command line)",
    )

    p = add("check-config", cmd_check_config, "validate a config file without contacting Vault")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument(
        "--credentials-dir",
        metavar="DIR",
        help="check the credential files here for ${CREDENTIALS_DIRECTORY} (e.g. /etc/keyd, where "
        "LoadCredential= reads them); without it and outside systemd they are reported as not checked",
    )

    p = add("grants", cmd_grants, "print what a caller may ask for; exit 1 when no grant matches")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--uid", type=int, help="the caller's uid")
    who.add_argument("--user", help="the caller's user name")
    p.add_argument("--unit", default="", help="the caller's systemd unit, e.g. php-fpm.service")
    p.add_argument(
        "--user-unit", default="", help="the caller's unit inside its own user manager (systemd --user)"
    )

    p = add("token", cmd_token, "ask a running keyd for a token and print it")
    p.add_argument("--user-id", help="user token for this TalkJS user id")
    p.add_argument("--app-token", action="store_true", help="an app (REST API) token instead")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: the app's configured ttl)")
    p.add_argument("--app", help="app table name (default: 'default' or the only app)")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the whole response")

    p = add("health", cmd_health, "print a running keyd's health; exit 1 when it cannot sign")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.add_argument(
        "--live",
        action="store_true",
        help="exit 0 whenever keyd answers, even when it cannot sign (a liveness probe)",
    )

    p = add(
        "reload",
        cmd_reload,
        "SIGHUP keyd and wait for the verdict; exit 0 applied, 1 failed (kept the old), 2 no answer",
    )
    p.add_argument("--pid", type=int, required=True, help="keyd's process id (systemd: $MAINPID)")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.add_argument("--timeout", type=_duration, default=60.0, help="longest wait for the verdict (60s)")

    p = add("status", cmd_status, "summarise a running keyd; exit 0 healthy, 1 degraded, 2 unreachable")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the health document as JSON, for scripts")

    vault_actions = sub.add_parser("vault", help="prepare Vault for keyd (run by a Vault operator)")
    actions = vault_actions.add_subparsers(dest="vault_command", required=True, metavar="ACTION")
    text = "enable AppRole, write keyd's policy and role, write its role_id/secret_id files (VAULT_TOKEN)"
    p = actions.add_parser("setup", help=text, description=text)
    p.set_defaults(func=cmd_vault_setup)
    _vault_setup_arguments(p)

    p = add("bench", cmd_bench, "load-test keyd; --compare adds Vault Transit, PyJWT and a bare server")
    p.add_argument("--socket", help="benchmark the keyd on this socket (default: start OpenBao dev + keyd)")
    p.add_argument("--concurrency", type=_positive, default=32, help="connections (default 32)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=_positive, help="requests per target")
    amount.add_argument("--duration", type=_duration, help="time per target (default 10s)")
    p.add_argument("--type", choices=("user", "app"), default="user", help="token type (default user)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--compare", action="store_true", help="also measure Transit HMAC, PyJWT, reference")
    p.add_argument("--vault-address", default="", help="Vault for --compare with --socket (env VAULT_ADDR)")
    p.add_argument("--memory", action="store_true", help="keyd's RSS idle and over --requests (1M) tokens")
    p.add_argument("--startup", action="store_true", help="time from `keyd run` to ready")
    p.add_argument(
        "--inprocess", action="store_true", help="CPU per request without sockets, keyd vs reference"
    )
    p.add_argument("--warmup", type=_duration, default=1.0, help="uncounted warm-up per target (1s)")
    p.add_argument(
        "--rest",
        action="store_true",
        help="the REST proxy vs calling a TalkJS stand-in directly; signing under proxy load",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="throughput against grants (1..10,000), apps (1..500) and open connections, one run",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default="",
        help="also draw throughput and p99 per target to FILE.png (needs the extra keyd[plot])",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except ClientError as exc:
        _err(f"{exc.message} ({exc.code}, HTTP {exc.status})" if exc.status else exc.message)
        return EXIT_FAILED
    except KeydError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
