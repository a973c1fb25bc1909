"""The command line: the only place that prints usage, maps errors to messages, and exits.

Exit codes: 0 success, 1 a request or the daemon failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence

from keyd import __version__
from keyd import config as configuration
from keyd.errors import ClientError, ConfigError, KeydError, StartupError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

DEFAULT_CONFIG = "/etc/keyd/config.toml"


def _socket_default() -> str:
    return os.environ.get(
        "KEYD_SOCKET", "run/keyd.sock" if os.path.exists("run/keyd.sock") else "/run/keyd/keyd.sock"
    )


def _err(message: str) -> None:
    print(f"keyd: {message}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from keyd import daemon, logs  # noqa: PLC0415 - keep light commands light

    config = configuration.load(args.config)
    problems = configuration.missing_files(config)
    if problems:
        raise ConfigError(problems)
    logs.setup(config.log.level, config.log.format)
    daemon.run(config)
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from keyd import dev, logs  # noqa: PLC0415

    logs.setup("info", "text")
    with contextlib.suppress(KeyboardInterrupt):
        dev.run_dev(args.socket)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    problems = configuration.missing_files(config)
    if problems:
        raise ConfigError(problems)
    print(f"{args.config}: ok ({len(config.apps)} app(s): {', '.join(config.apps)})")
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    from keyd.client import KeydClient  # noqa: PLC0415

    if args.app_token == bool(args.user_id):
        _err("give exactly one of --user-id ID or --app-token")
        return EXIT_CONFIG
    with KeydClient(args.socket) as client:
        if args.app_token:
            result = client.token(type="app", ttl=args.ttl, app=args.app)
        else:
            result = client.token(user_id=args.user_id, ttl=args.ttl, app=args.app)
    print(json.dumps(result, indent=2) if args.json else result["token"])
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from keyd.client import KeydClient  # noqa: PLC0415

    with KeydClient(args.socket) as client:
        status, doc = client.health()
    print(json.dumps(doc, indent=2))
    return EXIT_OK if status == 200 else EXIT_FAILED


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
    p.add_argument("--socket", default="run/keyd.sock", help="socket path (default run/keyd.sock)")

    p = add("check-config", cmd_check_config, "validate a config file without contacting Vault")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)

    p = add("token", cmd_token, "ask a running keyd for a token and print it")
    p.add_argument("--user-id", help="user token for this TalkJS user id")
    p.add_argument("--app-token", action="store_true", help="an app (REST API) token instead")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: the app's configured ttl)")
    p.add_argument("--app", help="app table name (default: 'default' or the only app)")
    p.add_argument("--socket", default=_socket_default(), help="keyd socket (env KEYD_SOCKET)")
    p.add_argument("--json", action="store_true", help="print the whole response")

    p = add("health", cmd_health, "print a running keyd's health; exit 1 when it cannot sign")
    p.add_argument("--socket", default=_socket_default(), help="keyd socket (env KEYD_SOCKET)")
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
