"""``keyd bench``: a load generator for keyd, and the comparisons that give its numbers a meaning.

The client is a lean asyncio (uvloop) program in its own process: ``concurrency`` keep-alive
connections, each with exactly one request in flight (no pipelining), so every latency is a real
round trip. A connection is a bare ``asyncio.Protocol`` that sends its next request from
``data_received``: no task or future per request, so the client is rarely the bottleneck.

``--compare`` measures, in the same run and with the same load shape:

- ``keyd``: ``POST /v1/tokens`` on keyd's Unix socket;
- ``reference``: a bare asyncio + httptools + uvloop server (in this module, run as its own process)
  that reads ``user_id`` from the JSON body and returns an HS256 token built from a precomputed
  header: the ceiling for any Python token server on this machine;
- ``transit``: ``POST transit/hmac/<key>`` on the same OpenBao (the peer design where the key never
  leaves Vault and every signature is a round trip), over keep-alive HTTP, with the TalkJS key
  imported into Transit (RSA-OAEP + AES-KWP wrapping, the Vault/OpenBao BYOK scheme);
- ``pyjwt``: ``jwt.encode`` in-process (what an app server does when it holds the key).

Without ``--socket`` the bench starts its own stack, as ``keyd dev`` does: an OpenBao dev server
with a random demo key, keyd on it, and the reference server, and stops them at the end. The key
and every token stay in memory; nothing secret is printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import math
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from keyd.errors import KeydError

T = TypeVar("T")

DEFAULT_CONCURRENCY = 32
DEFAULT_DURATION = 10.0
WARMUP_SECONDS = 1.0
USER_IDS = 1024  # distinct user ids cycled through, so no answer is a cached constant
APP_ID = "tBenchApp"
TOKEN_TTL = 3600

# The targets on a 2-core machine, concurrency 32, client in its own process.
TARGET_VS_TRANSIT = 4.0
TARGET_VS_REFERENCE = 0.7
TARGET_P99_MS = 3.0
TARGET_IDLE_RSS_MB = 50.0
TARGET_GROWTH_MB = 5.0
TARGET_READY_S = 1.0

_HEADER_B64 = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=") + b"."


class BenchError(KeydError):
    """The benchmark could not run (no keyd on the socket, OpenBao missing, a server died)."""


# -- results -----------------------------------------------------------------------------------


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


@dataclass
class Result:
    """What one target did under load: counts by status and the latency distribution."""

    name: str
    requests: int
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    note: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def non_200(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + self.connection_errors

    @classmethod
    def from_latencies(
        cls, name: str, latencies: list[float], seconds: float, statuses: dict[int, int], errors: int
    ) -> Result:
        ordered = sorted(latencies)
        ms = 1000.0
        return cls(
            name=name,
            requests=len(ordered),
            seconds=seconds,
            statuses=dict(sorted(statuses.items())),
            connection_errors=errors,
            p50_ms=percentile(ordered, 0.50) * ms,
            p90_ms=percentile(ordered, 0.90) * ms,
            p99_ms=percentile(ordered, 0.99) * ms,
            max_ms=(ordered[-1] if ordered else 0.0) * ms,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput, 1),
            "non_200": self.non_200,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "connection_errors": self.connection_errors,
            "latency_ms": {
                "p50": round(self.p50_ms, 3),
                "p90": round(self.p90_ms, 3),
                "p99": round(self.p99_ms, 3),
                "max": round(self.max_ms, 3),
            },
            **({"note": self.note} if self.note else {}),
        }

    def line(self) -> str:
        return (
            f"{self.name:<10} {self.throughput:>10,.0f} req/s  "
            f"p50 {self.p50_ms:6.2f}  p90 {self.p90_ms:6.2f}  p99 {self.p99_ms:6.2f}  "
            f"max {self.max_ms:7.2f} ms  non-200 {self.non_200}  ({self.requests:,} in {self.seconds:.1f}s)"
        )


# -- the load generator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where to connect: a Unix socket path, or a TCP host and port (optionally TLS)."""

    unix: str = ""
    host: str = ""
    port: int = 0
    tls: ssl.SSLContext | None = None


class _Load:
    """State shared by the connections of one run: what to send, when to stop, what came back."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: Endpoint,
        requests: list[bytes],
        total: int | None,
        seconds: float | None,
        concurrency: int,
    ) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.requests = requests
        self.count = len(requests)
        self.index = 0
        self.remaining = total if total is not None else -1
        self.deadline = loop.time() + seconds if seconds is not None else float("inf")
        self.concurrency = concurrency
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.active = 0
        self.done: asyncio.Future[None] = loop.create_future()

    def take(self) -> bytes | None:
        """The next request to send, or None when the run is over."""
        if self.remaining >= 0:
            if self.remaining == 0:
                return None
            self.remaining -= 1
        elif self.loop.time() >= self.deadline:
            return None
        i = self.index
        self.index = i + 1 if i + 1 < self.count else 0
        return self.requests[i]

    def record(self, status: int, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def over(self) -> bool:
        return self.remaining == 0 or self.loop.time() >= self.deadline

    def connection_ended(self, reconnect: bool) -> None:
        if reconnect and not self.over():
            # The server closed on us mid-run: reconnect so the load shape stays the same.
            self.loop.create_task(self._connect())
            return
        self.active -= 1
        if self.active <= 0 and not self.done.done():
            self.done.set_result(None)

    def start(self) -> None:
        self.active = self.concurrency
        for _ in range(self.concurrency):
            self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        """Open one connection (counted in ``active`` by the caller); retry while the run lasts."""
        attempts = 0
        while True:
            try:
                if self.endpoint.unix:
                    await self.loop.create_unix_connection(lambda: _Client(self), self.endpoint.unix)
                else:
                    await self.loop.create_connection(
                        lambda: _Client(self), self.endpoint.host, self.endpoint.port, ssl=self.endpoint.tls
                    )
                return
            except OSError:
                self.errors += 1
                attempts += 1
                if self.over() or attempts >= 50:
                    self.remaining = 0  # give up: nobody has accepted for a second
                    self.connection_ended(False)
                    return
                await asyncio.sleep(0.02)


class _Client(asyncio.Protocol):
    """One keep-alive connection with one request in flight; parses just enough HTTP/1.1."""

    __slots__ = ("buffer", "ended", "load", "need", "sent_at", "server_closed", "transport")

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: Any = None
        self.buffer = b""
        self.need = -1  # bytes of the whole current response, once its head is parsed
        self.sent_at = 0.0
        self.ended = False  # no more work: closed by us at the end of the run
        self.server_closed = False  # the last answer said "Connection: close"

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        request = self.load.take()
        if request is None:
            self.ended = True
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        need = self.need
        if need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            need = response_length(buffer, end)
            if need < 0:  # chunked: complete once the terminating chunk has arrived
                if not buffer.endswith(b"0\r\n\r\n"):
                    self.buffer = buffer
                    return
                need = len(buffer)
            self.need = need
        if len(buffer) < need:
            self.buffer = buffer
            return
        self.load.record(int(buffer[9:12]), time.perf_counter() - self.sent_at)
        head = buffer[:need]
        self.buffer = b""
        self.need = -1
        if b"\r\nConnection: close" in head or b"\r\nconnection: close" in head:
            self.server_closed = True
            self.transport.close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended:
            self.load.connection_ended(False)
            return
        if not self.server_closed:
            self.load.errors += 1  # dropped with a request in flight
        self.load.connection_ended(True)


def response_length(buffer: bytes, head_end: int) -> int:
    """Total length of the response whose head ends at ``head_end``; -1 for chunked bodies."""
    head = buffer[:head_end]
    at = head.find(b"\r\nContent-Length:")
    if at < 0:
        lowered = head.lower()
        at = lowered.find(b"\r\ncontent-length:")
        if at < 0:
            if b"chunked" in lowered:
                return -1
            return head_end + 4  # no body (204, 304)
    start = at + 17
    stop = head.find(b"\r\n", start)
    return head_end + 4 + int(head[start : stop if stop >= 0 else len(head)])


async def _progress(name: str, load: _Load, out: TextIO) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(0.5)
        done = len(load.latencies)
        rate = done / max(1e-9, time.perf_counter() - started)
        out.write(f"\r  {name}: {done:,} requests, {rate:,.0f}/s   ")
        out.flush()


async def run_load(
    name: str,
    endpoint: Endpoint,
    requests: list[bytes],
    concurrency: int = DEFAULT_CONCURRENCY,
    total: int | None = None,
    seconds: float | None = None,
    warmup: float = WARMUP_SECONDS,
    progress: TextIO | None = None,
) -> Result:
    """Drive ``endpoint`` with ``concurrency`` keep-alive connections; one request in flight each.

    Stops after ``total`` requests or ``seconds``; a short warm-up run (not counted) comes first so
    connection set-up and first-call costs stay out of the numbers.
    """
    if (total is None) == (seconds is None):
        raise ValueError("give exactly one of total or seconds")
    loop = asyncio.get_running_loop()
    if warmup > 0:
        await _drive(_Load(loop, endpoint, requests, None, warmup, concurrency))
    load = _Load(loop, endpoint, requests, total, seconds, concurrency)
    ticker = loop.create_task(_progress(name, load, progress)) if progress is not None else None
    started = time.perf_counter()
    await _drive(load)
    elapsed = time.perf_counter() - started
    if ticker is not None:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        progress.write("\r" + " " * 60 + "\r")  # type: ignore[union-attr] # set with the ticker
        progress.flush()  # type: ignore[union-attr]
    return Result.from_latencies(name, load.latencies, elapsed, load.statuses, load.errors)


async def _drive(load: _Load) -> None:
    load.start()
    await load.done


# -- what each target is asked ------------------------------------------------------------------


def user_ids(count: int = USER_IDS) -> list[str]:
    return [f"user-{i:05d}" for i in range(count)]


def keyd_requests(kind: str = "user", count: int = USER_IDS) -> list[bytes]:
    """``POST /v1/tokens`` requests for keyd (and the reference server), one per user id."""
    bodies = (
        [json.dumps({"user_id": uid}).encode() for uid in user_ids(count)]
        if kind == "user"
        else [b'{"type":"app"}']
    )
    return [
        b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        for body in bodies
    ]


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signing_input(kind: str, user_id: str, iat: int) -> bytes:
    """The JWT signing input (header.payload) of the token keyd would issue."""
    claims: dict[str, Any] = {"tokenType": kind, "iss": APP_ID}
    if kind == "user":
        claims["sub"] = user_id
    claims.update(iat=iat, exp=iat + TOKEN_TTL)
    return _HEADER_B64 + _b64url(json.dumps(claims, separators=(",", ":")).encode())


def transit_requests(address: str, vault_token: str, mount: str, key: str, kind: str) -> list[bytes]:
    """``POST <mount>/hmac/<key>/sha2-256`` over HTTP/1.1 keep-alive, one per user id.

    Each asks Vault for the HMAC of the same signing input keyd signs: the round trip an app server
    makes per token when the key stays inside Vault.
    """
    host = urlsplit(address).netloc
    iat = int(time.time())
    out = []
    for uid in user_ids() if kind == "user" else [""]:
        body = json.dumps({"input": base64.b64encode(signing_input(kind, uid, iat)).decode()}).encode()
        out.append(
            f"POST /v1/{mount}/hmac/{key}/sha2-256 HTTP/1.1\r\nHost: {host}\r\n".encode()
            + b"X-Vault-Token: "
            + vault_token.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
    return out


def vault_endpoint(address: str, ca_cert: str = "") -> Endpoint:
    parts = urlsplit(address)
    tls = None
    if parts.scheme == "https":
        tls = ssl.create_default_context(cafile=ca_cert or None)
    port = parts.port or (443 if tls else 80)
    return Endpoint(host=parts.hostname or "127.0.0.1", port=port, tls=tls)


def pyjwt_run(key: bytes, kind: str, seconds: float) -> Result:
    """``jwt.encode`` in this process on one core for ``seconds``: what an app holding the key does."""
    import jwt  # noqa: PLC0415 - only the comparison needs it

    ids = user_ids()
    latencies: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    i = 0
    started = clock()
    while True:
        t0 = clock()
        if t0 >= end:
            break
        now = int(time.time())
        claims: dict[str, Any] = {"tokenType": kind, "iss": APP_ID}
        if kind == "user":
            claims["sub"] = ids[i & (USER_IDS - 1)]
        claims["iat"] = now
        claims["exp"] = now + TOKEN_TTL
        jwt.encode(claims, key, algorithm="HS256")
        latencies.append(clock() - t0)
        i += 1
    elapsed = clock() - started
    result = Result.from_latencies("pyjwt", latencies, elapsed, {200: len(latencies)}, 0)
    result.note = "in-process, one thread, no I/O"
    return result


# -- the reference server -----------------------------------------------------------------------


class ReferenceConnection(asyncio.Protocol):
    """The least a Python token server can do: parse HTTP, read user_id, sign, answer."""

    def __init__(self, mac: Any) -> None:
        import httptools  # noqa: PLC0415 - only the reference server process needs it

        self.mac = mac
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.body = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # a benchmark fixture: any bad input just ends the connection
            self.transport.close()

    def on_message_begin(self) -> None:
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        user_id = json.loads(self.body).get("user_id")
        now = int(time.time())
        if user_id is None:
            payload = f'{{"tokenType":"app","iss":"{APP_ID}","iat":{now},"exp":{now + 30}}}'
        else:
            payload = (
                f'{{"tokenType":"user","iss":"{APP_ID}","sub":{json.dumps(user_id)},'
                f'"iat":{now},"exp":{now + TOKEN_TTL}}}'
            )
        message = _HEADER_B64 + _b64url(payload.encode())
        mac = self.mac.copy()
        mac.update(message)
        body = b'{"token":"' + message + b"." + _b64url(mac.digest()) + b'"}'
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)
        )


def serve_reference(path: str) -> None:
    """Run the reference server on a Unix socket at ``path`` until SIGTERM (its own process)."""
    import uvloop  # noqa: PLC0415

    async def main() -> None:
        loop = asyncio.get_running_loop()
        mac = hmac.new(secrets.token_bytes(32), digestmod="sha256")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await loop.create_unix_server(lambda: ReferenceConnection(mac), path, backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    uvloop.run(main())


# -- Vault Transit ------------------------------------------------------------------------------


def wrap_for_import(key: bytes, wrapping_key_pem: str) -> str:
    """Wrap ``key`` for Transit's BYOK import: RSA-OAEP(SHA-256) of an ephemeral AES-256 key,
    followed by the key wrapped with that AES key (AES-KWP, RFC 5649); base64 of both."""
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: PLC0415
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding  # noqa: PLC0415

    public = serialization.load_pem_public_key(wrapping_key_pem.encode())
    if not isinstance(public, rsa.RSAPublicKey):
        raise BenchError("the Transit wrapping key is not an RSA key")
    ephemeral = secrets.token_bytes(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = public.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, key)
    return base64.b64encode(wrapped).decode("ascii")


class Transit:
    """A Transit mount created for one run, holding the HMAC key; removed by ``close``."""

    KEY = "talkjs"

    def __init__(self, client: Any) -> None:
        self.client = client
        self.mount = "keyd-bench-" + secrets.token_hex(4)
        self.how = ""

    def setup(self, key: bytes) -> str:
        """Import ``key`` as an HMAC key (or generate one where import is refused); says which."""
        import hvac.exceptions  # noqa: PLC0415

        self.client.sys.enable_secrets_engine("transit", path=self.mount)
        adapter = self.client.adapter
        try:
            pem = adapter.get(f"/v1/{self.mount}/wrapping_key")["data"]["public_key"]
            adapter.post(
                f"/v1/{self.mount}/keys/{self.KEY}/import",
                json={"ciphertext": wrap_for_import(key, pem), "hash_function": "SHA256", "type": "hmac"},
            )
        except hvac.exceptions.VaultError as exc:
            adapter.post(f"/v1/{self.mount}/keys/{self.KEY}", json={"type": "hmac", "key_size": 32})
            self.how = f"generated Transit HMAC key (import refused: {type(exc).__name__})"
            return self.how
        # Prove the import: Transit's HMAC of a message must equal ours with the same key.
        message = b"keyd bench import check"
        answer = adapter.post(
            f"/v1/{self.mount}/hmac/{self.KEY}/sha2-256",
            json={"input": base64.b64encode(message).decode()},
        )["data"]["hmac"]
        expected = "vault:v1:" + base64.b64encode(hmac.digest(key, message, "sha256")).decode()
        if not hmac.compare_digest(answer, expected):
            raise BenchError("the key imported into Transit does not reproduce keyd's HMAC")
        self.how = "TalkJS key imported into Transit (RSA-OAEP + AES-KWP), HMACs match keyd's"
        return self.how

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.sys.disable_secrets_engine(path=self.mount)


# -- a self-contained stack: OpenBao dev server + keyd + reference ------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def _health_status(path: str) -> int:
    """Status code of GET /v1/health on a Unix socket, 0 when nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(path)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
        return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0
    except (OSError, ValueError):
        return 0


_KEYD_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0600"

[vault]
address = {address}
timeout = "5s"

[vault.auth]
method = "token"

[refresh]
interval = "5m"
max_stale = "1h"

[log]
level = "warning"

[apps.default]
app_id = "{app_id}"
path = "{path}"

[[grant]]
uid = {uid}
types = ["user", "app"]
"""


class Stack:
    """The processes a self-contained run needs, all children of the bench, all stopped by close."""

    PATH = "talkjs/bench"

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="kb-", dir="/tmp")  # short: socket paths <= 107 bytes
        self.bao: Any = None
        self.key = b""
        self.keyd: subprocess.Popen[bytes] | None = None
        self.reference: subprocess.Popen[bytes] | None = None
        self.keyd_socket = os.path.join(self.workdir, "keyd.sock")
        self.reference_socket = os.path.join(self.workdir, "ref.sock")
        self.config_path = os.path.join(self.workdir, "keyd.toml")

    def start_vault(self) -> None:
        from keyd.ops.dev import BaoServer, demo_key  # noqa: PLC0415 - needs the dev extra

        self.bao = BaoServer(dev=True).start()
        key = demo_key()
        self.key = key.encode()
        self.bao.client().secrets.kv.v2.create_or_update_secret(
            path=self.PATH, secret={"secret_key": key}, mount_point="secret"
        )
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(
                _KEYD_CONFIG.format(
                    socket=json.dumps(self.keyd_socket),
                    address=json.dumps(self.bao.address),
                    app_id=APP_ID,
                    path=self.PATH,
                    uid=os.getuid(),
                )
            )

    def start_keyd(self, timeout: float = 20.0) -> tuple[float, float]:
        """Start keyd and wait until it can sign: (seconds to listening, seconds to ready)."""
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        env["VAULT_TOKEN"] = self.bao.root_token  # a throwaway dev server's token, read once by keyd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.keyd_socket)
        log = open(os.path.join(self.workdir, "keyd.log"), "ab")  # noqa: SIM115 - owned by the child
        started = time.perf_counter()
        self.keyd = subprocess.Popen(
            [sys.executable, "-m", "keyd", "run", "-c", self.config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        log.close()
        listening = 0.0
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.keyd.poll() is not None:
                raise BenchError(f"keyd exited with {self.keyd.returncode}:\n{self._keyd_log_tail()}")
            status = _health_status(self.keyd_socket)
            if status and not listening:
                listening = time.perf_counter() - started
            if status == 200:
                return listening, time.perf_counter() - started
            time.sleep(0.002)
        raise BenchError(f"keyd was not ready within {timeout:.0f}s:\n{self._keyd_log_tail()}")

    def _keyd_log_tail(self, lines: int = 15) -> str:
        """The end of keyd's log, for an error message: the work directory is removed on exit."""
        try:
            with open(os.path.join(self.workdir, "keyd.log"), encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:]).rstrip() or "(keyd wrote nothing)"
        except OSError:
            return "(no keyd log)"

    def stop_keyd(self) -> None:
        _stop(self.keyd)
        self.keyd = None

    def start_reference(self, timeout: float = 10.0) -> None:
        self.reference = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from keyd.bench.main import serve_reference; serve_reference({self.reference_socket!r})",
            ],
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(self.reference_socket)
                return
            if self.reference.poll() is not None:
                break
            time.sleep(0.02)
        raise BenchError("the reference server did not start")

    def close(self) -> None:
        _stop(self.reference)
        _stop(self.keyd)
        if self.bao is not None:
            self.bao.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


# -- the command ---------------------------------------------------------------------------------


@dataclass
class Options:
    """``keyd bench`` options (cli.py parses them)."""

    socket: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    requests: int | None = None
    duration: float | None = None
    kind: str = "user"
    json: bool = False
    compare: bool = False
    vault_address: str = ""
    memory: bool = False
    startup: bool = False
    inprocess: bool = False
    warmup: float = WARMUP_SECONDS
    rest: bool = False


def machine() -> dict[str, Any]:
    """What the numbers were measured on (cores, load, Python, event loop)."""
    import platform  # noqa: PLC0415

    load1, load5, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(load1, 2), round(load5, 2)],
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def loop_run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(options: Options, out: TextIO = sys.stdout) -> tuple[dict[str, Any], bool]:
    """Run the benchmark the options describe; (report document, whether every answer was a 200)."""
    if options.memory:
        report = _memory(options, out)
        return report, report["non_200"] == 0
    if options.startup:
        return _startup(options, out), True
    progress = out if (out.isatty() and not options.json) else None
    total = options.requests
    seconds = None if total is not None else (options.duration or DEFAULT_DURATION)
    doc: dict[str, Any] = {
        "machine": machine(),
        "load": {
            "concurrency": options.concurrency,
            "requests": total,
            "duration": seconds,
            "type": options.kind,
            "client": "asyncio+uvloop, keep-alive, one request in flight per connection",
        },
    }
    results: dict[str, Result] = {}

    def say(text: str) -> None:
        if not options.json:
            print(text, file=out, flush=True)

    def measure(name: str, endpoint: Endpoint, requests: list[bytes]) -> Result:
        result = loop_run(
            run_load(name, endpoint, requests, options.concurrency, total, seconds, options.warmup, progress)
        )
        results[name] = result
        say(result.line())
        return result

    with stack() as s:
        if options.socket is None:
            say("starting an OpenBao dev server and keyd (no --socket given) ...")
            s.start_vault()
            s.start_keyd()
            socket_path = s.keyd_socket
        else:
            socket_path = options.socket
            if _health_status(socket_path) == 0:
                raise BenchError(f"no keyd answers on {socket_path} (start one, or omit --socket)")
        shape = f"{options.concurrency} connections, " + (
            f"{total:,} requests" if total is not None else f"{seconds:g}s"
        )
        say(f"keyd bench: {options.kind} tokens, {shape} per target, {os.cpu_count()} CPUs")
        measure("keyd", Endpoint(unix=socket_path), keyd_requests(options.kind))
        if options.compare:
            s.start_reference()
            measure("reference", Endpoint(unix=s.reference_socket), keyd_requests(options.kind))
            transit_doc = _transit(options, s, measure, say)
            doc["transit"] = transit_doc
            pyjwt = pyjwt_run(s.key or secrets.token_bytes(32), options.kind, seconds or 5.0)
            results["pyjwt"] = pyjwt
            say(pyjwt.line())
    doc["results"] = {name: r.to_json() for name, r in results.items()}
    if options.compare:
        doc["ratios"], doc["targets"] = _ratios(results)
        for line in _ratio_lines(doc["ratios"], doc["targets"]):
            say(line)
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    return doc, results["keyd"].non_200 == 0


def _transit(
    options: Options,
    s: Stack,
    measure: Callable[[str, Endpoint, list[bytes]], Result],
    say: Callable[[str], None],
) -> dict[str, Any]:
    import hvac  # noqa: PLC0415

    if options.socket is None:
        address, token, key = s.bao.address, s.bao.root_token, s.key
    else:
        address = options.vault_address or os.environ.get("VAULT_ADDR", "")
        token = os.environ.get("VAULT_TOKEN", "")
        if not address or not token:
            raise BenchError("--compare with --socket needs --vault-address (or VAULT_ADDR) and VAULT_TOKEN")
        key = ("sk_test_" + secrets.token_urlsafe(24)).encode()  # keyd never reveals its key
    transit = Transit(hvac.Client(url=address, token=token))
    try:
        how = transit.setup(key)
        if options.socket is not None:
            how += " (a random key of the same form: keyd never hands out the real one)"
        say(f"transit:   {how}")
        requests = transit_requests(address, token, transit.mount, Transit.KEY, options.kind)
        result = measure("transit", vault_endpoint(address), requests)
        result.note = how
    finally:
        transit.close()
    return {"key": how, "address": address}


def _ratios(results: dict[str, Result]) -> tuple[dict[str, float], dict[str, Any]]:
    keyd = results["keyd"]
    ratios = {
        f"keyd/{name}": round(keyd.throughput / r.throughput, 3) if r.throughput else 0.0
        for name, r in results.items()
        if name != "keyd"
    }
    targets = {
        "throughput_vs_transit": {
            "target": TARGET_VS_TRANSIT,
            "got": ratios.get("keyd/transit"),
            "met": ratios.get("keyd/transit", 0) >= TARGET_VS_TRANSIT,
        },
        "throughput_vs_reference": {
            "target": TARGET_VS_REFERENCE,
            "got": ratios.get("keyd/reference"),
            "met": ratios.get("keyd/reference", 0) >= TARGET_VS_REFERENCE,
        },
        "p99_ms": {
            "target": TARGET_P99_MS,
            "got": round(keyd.p99_ms, 3),
            "met": keyd.p99_ms <= TARGET_P99_MS,
        },
        "no_errors": {"target": 0, "got": keyd.non_200, "met": keyd.non_200 == 0},
    }
    return ratios, targets


def _ratio_lines(ratios: dict[str, float], targets: dict[str, Any]) -> list[str]:
    lines = ["ratios:    " + "   ".join(f"{name} {value:.2f}x" for name, value in ratios.items())]
    marks = []
    for name, t in targets.items():
        marks.append(f"{name} {'met' if t['met'] else 'MISSED'} ({t['got']} vs {t['target']})")
    lines.append("targets:   " + "; ".join(marks))
    return lines


def _memory(options: Options, out: TextIO) -> dict[str, Any]:
    """keyd's RSS idle with one app, after a warm-up, and after ``requests`` tokens (default 1M)."""
    total = options.requests or 1_000_000
    mb = 1e6
    progress = out if (out.isatty() and not options.json) else None
    with stack() as s:
        s.start_vault()
        s.start_keyd()
        assert s.keyd is not None  # noqa: S101 - started just above
        pid = s.keyd.pid
        time.sleep(1.0)
        idle = rss_bytes(pid)
        endpoint = Endpoint(unix=s.keyd_socket)
        requests = keyd_requests(options.kind)
        loop_run(run_load("warm-up", endpoint, requests, options.concurrency, total=20_000, warmup=0))
        warm = rss_bytes(pid)
        result = loop_run(
            run_load(
                "keyd", endpoint, requests, options.concurrency, total=total, warmup=0, progress=progress
            )
        )
        time.sleep(0.5)
        after = rss_bytes(pid)
    doc: dict[str, Any] = {
        "machine": machine(),
        "tokens": result.requests,
        "non_200": result.non_200,
        "rss_mb": {
            "idle": round(idle / mb, 1),
            "after_warmup": round(warm / mb, 1),
            "after": round(after / mb, 1),
        },
        "growth_mb": round((after - warm) / mb, 2),
        "growth_from_idle_mb": round((after - idle) / mb, 2),
        "targets": {
            "idle_rss_mb": {"target": TARGET_IDLE_RSS_MB, "met": idle / mb <= TARGET_IDLE_RSS_MB},
            "growth_mb": {"target": TARGET_GROWTH_MB, "met": (after - warm) / mb <= TARGET_GROWTH_MB},
        },
    }
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        r = doc["rss_mb"]
        print(
            f"keyd RSS: idle {r['idle']} MB (one app loaded), after 20k warm-up {r['after_warmup']} MB, "
            f"after {result.requests:,} more tokens {r['after']} MB: growth {doc['growth_mb']} MB "
            f"({doc['growth_from_idle_mb']} MB from idle); non-200 {result.non_200}",
            file=out,
        )
        print(
            f"targets:   idle <= {TARGET_IDLE_RSS_MB:g} MB "
            f"{'met' if doc['targets']['idle_rss_mb']['met'] else 'MISSED'}; growth <= {TARGET_GROWTH_MB:g} MB "
            f"{'met' if doc['targets']['growth_mb']['met'] else 'MISSED'}",
            file=out,
        )
    return doc


def _startup(options: Options, out: TextIO, runs: int = 5) -> dict[str, Any]:
    """Seconds from starting ``keyd run`` (Vault already answering) to listening and to ready."""
    listening: list[float] = []
    ready: list[float] = []
    with stack() as s:
        s.start_vault()
        for _ in range(runs):
            first, whole = s.start_keyd()
            listening.append(first)
            ready.append(whole)
            s.stop_keyd()
    doc: dict[str, Any] = {
        "machine": machine(),
        "runs": runs,
        "listening_s": [round(x, 3) for x in listening],
        "ready_s": [round(x, 3) for x in ready],
        "ready_median_s": round(sorted(ready)[runs // 2], 3),
        "targets": {"ready_s": {"target": TARGET_READY_S, "met": max(ready) <= TARGET_READY_S}},
    }
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        print(
            f"keyd start-up ({runs} runs, Vault already up): listening after "
            f"{', '.join(f'{x:.3f}' for x in listening)} s; ready (health 200) after "
            f"{', '.join(f'{x:.3f}' for x in ready)} s",
            file=out,
        )
        met = doc["targets"]["ready_s"]["met"]
        print(f"targets:   ready <= {TARGET_READY_S:g} s {'met' if met else 'MISSED'}", file=out)
    return doc
