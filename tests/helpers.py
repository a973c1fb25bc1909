"""Shared test helpers: write TOML, run keyd as a real process, talk HTTP over its socket."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from keyd import http1
from keyd.config import AppConfig, Config, GrantConfig, RefreshConfig, ServerConfig, VaultConfig

ROOT = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs: scalars, lists, tables, and lists of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            tables.append((name, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((name, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        out += f"\n[{name}]\n" + to_toml(table, name)
    for name, items in arrays:
        for item in items:
            out += f"\n[[{name}]]\n" + to_toml(item, name)
    return out


def minimal_config(**apps_extra: Any) -> dict[str, Any]:
    """The smallest config dict keyd.config.parse accepts: one app `default` (tApp), with
    ``apps_extra`` in its table. Config parsing tests add the sections they test."""
    return {"apps": {"default": {"app_id": "tApp", **apps_extra}}}


def built_config(
    *apps: AppConfig, grants: Iterable[GrantConfig] = (), server: ServerConfig | None = None, source: str = "test.toml"
) -> Config:
    """A keyd Config made from dataclasses, not TOML: default server (unless given), vault and
    refresh sections, ``apps`` by name, ``grants`` in order. For unit tests of the parts that take a
    parsed config (policy, check-config warnings, audit)."""
    return Config(
        source=source,
        server=server or ServerConfig(),
        vault=VaultConfig(),
        refresh=RefreshConfig(),
        apps={app.name: app for app in apps},
        grants=tuple(grants),
    )


class Http:
    """A keep-alive HTTP/1.1 client over a Unix socket; returns (status, headers, body bytes)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("keyd", timeout=self.timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        conn.sock = sock
        return conn

    def request(
        self,
        method: str,
        url: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        if self.conn is None:
            self.conn = self._connect()
        if isinstance(body, str):
            body = body.encode()
        self.conn.request(method, url, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return resp.status, hdrs, data

    def post_json(self, url: str, payload: Any) -> tuple[int, Any]:
        status, _, data = self.request("POST", url, json.dumps(payload), {"Content-Type": "application/json"})
        return status, json.loads(data)

    def get_json(self, url: str) -> tuple[int, Any]:
        status, _, data = self.request("GET", url)
        return status, json.loads(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class KeydProcess:
    """keyd run -c CONFIG as a child process, with its stderr captured to a file."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        python_args: tuple[str, ...] = ("-m", "keyd"),
    ):
        """``prefix`` runs before Python (e.g. systemd-socket-activate ... --); ``python_args`` replace
        ``-m keyd`` (e.g. ``-c WRAPPER`` that sandboxes the process, then runs keyd's CLI)."""
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "keyd.toml"
        self.log_path = workdir / "keyd.log"
        self.socket = str(config["server"]["socket"])
        self.env = env or {}
        self.prefix = prefix
        self.python_args = python_args
        self.python = sys.executable  # another one when keyd runs as a user who cannot reach it
        self.process: subprocess.Popen[bytes] | None = None
        self.responses: list[bytes] = []

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> KeydProcess:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "NOTIFY_SOCKET")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, self.python, *self.python_args, "run", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.workdir),
            )
        self.wait_for_socket(timeout)
        if wait_ready:
            self.wait_health(200, timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_for_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"keyd exited with {self.process.returncode}:\n{self.logs()}")
            if os.path.exists(self.socket):
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket)
                    return
            time.sleep(0.05)
        raise AssertionError(f"keyd socket did not appear:\n{self.logs()}")

    def wait_health(
        self, status: int = 200, timeout: float = 20.0, field: str | None = None, value: Any = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                got, doc = self.http().get_json("/v1/health")
                last = (got, doc)
                if got == status and (field is None or doc.get(field) == value):
                    return dict(doc)
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"health never reached {status} {field}={value}: {last}\n{self.logs()}")

    def http(self) -> Http:
        return RecordingHttp(self.socket, self.responses)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class RecordingHttp(Http):
    """Http that keeps every response body, so a test can search all of them for secrets."""

    def __init__(self, path: str, sink: list[bytes]) -> None:
        super().__init__(path)
        self.sink = sink

    def request(
        self, method: str, url: str, body: bytes | str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        status, hdrs, data = super().request(method, url, body, headers)
        self.sink.append(json.dumps(hdrs).encode() + data)
        return status, hdrs, data


class Eof(EOFError):
    """The connection closed before a whole answer; ``args[0]`` holds the bytes that came."""

    @property
    def truncated(self) -> bool:
        """Part of an answer came before the close (not just nothing at all)."""
        return bool(self.args[0])


class RawResponse(NamedTuple):
    status: int
    headers: dict[bytes, bytes]  # lower-cased names; the last of a repeated header
    body: bytes
    closes: bool  # the server closes the connection after this answer


class RawReader:
    """HTTP/1.1 answers with a Content-Length read one after another from a raw socket, for tests
    that speak HTTP by hand (pipelining, half-sent requests, floods): the bytes after one answer
    stay in ``buffer`` for the next. The head is parsed by keyd.http1, as the load generator does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def fill(self) -> bool:
        """Receive once into ``buffer``; False when the peer closed."""
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> RawResponse:
        """The next answer; raises Eof when the connection closes first."""
        while b"\r\n\r\n" not in self.buffer:
            if not self.fill():
                raise Eof(self.buffer)
        head = self.buffer.partition(b"\r\n\r\n")[0]
        parsed = http1.parse_response_head(head)
        length = parsed.length if parsed.length is not None and parsed.length >= 0 else 0
        while len(self.buffer) - len(head) - 4 < length:
            if not self.fill():
                raise Eof(self.buffer)
        rest = self.buffer[len(head) + 4 :]
        self.buffer = rest[length:]
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return RawResponse(parsed.status, headers, rest[:length], not parsed.keep_alive)

    def closed_by_peer(self) -> bool:
        """Nothing more is buffered and the peer has closed (or reset) the connection."""
        try:
            return not self.buffer and not self.fill()
        except ConnectionResetError:
            return True


class RawConnection(RawReader):
    """A raw Unix-socket connection of its own: send bytes, read whole answers (RawReader)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        super().__init__(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def read_response(sock: socket.socket) -> RawResponse:
    """One answer read from ``sock`` (RawReader.response); any bytes after it are dropped."""
    return RawReader(sock).response()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def run_vault_setup(
    config: dict[str, Any], directory: Path, token: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m keyd vault setup` as an operator would run it: config file, VAULT_TOKEN, no env dir."""
    path = directory / "setup.toml"
    path.write_text(to_toml(config))
    env = {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "CREDENTIALS_DIRECTORY")}
    env["VAULT_TOKEN"] = token
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "keyd",
            "vault",
            "setup",
            "-c",
            str(path),
            "--credentials-dir",
            str(directory),
            *args,
        ],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=60,
        check=False,
    )
