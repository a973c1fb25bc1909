"""A local HTTPS stand-in for TalkJS's REST API, strict about what it accepts (tests only).

It checks every request the way TalkJS does, and more strictly: the bearer token verifies with the
app's secret key (HS256, PyJWT), carries exactly ``tokenType``/``iss``/``iat``/``exp`` with
``tokenType == "app"`` and ``iss`` the app id, lives at most ``max_lifetime`` seconds, has not
expired, and was never seen before; the path starts with ``/v1/<app id>/``. A request that fails a
check is answered 401 and recorded with the reason. Its certificate comes from a CA made here.

Tests script the answers: ``standin.script.append(Action(status=503))`` answers the next request
with a 503; actions can also be slow (``delay``), reset the connection (``reset``) or carry
headers (``Retry-After``). Without a script every request gets 200 and a JSON echo.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt

from keyd.bench.standin import make_certificates

CLAIMS = {"tokenType", "iss", "iat", "exp"}


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost: (ca.pem, cert, key).

    The bench's stand-in makes its certificates the same way; one copy of that code, in keyd.bench.
    """
    return make_certificates(directory)


@dataclass
class Action:
    """How to answer one request: status, body, headers, a delay before answering, or a reset."""

    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False


@dataclass
class Received:
    """One request as the stand-in saw it (the token is kept only to check it is never reused)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    claims: dict[str, Any] | None
    header: dict[str, Any] | None
    problem: str | None
    connection: int
    at: float


class StandIn:
    """The server; ``with StandIn(key, app_id, directory) as s: ... s.url ... s.received``."""

    def __init__(self, key: str, app_id: str, directory: Path, max_lifetime: int = 10) -> None:
        self.key = key
        self.app_id = app_id
        self.max_lifetime = max_lifetime
        self.ca, cert, private = make_ca(directory)
        self.received: list[Received] = []
        self.script: deque[Action] = deque()
        # Seconds to wait before answering a path (when no scripted action says otherwise).
        self.delay_for: Callable[[str], float] | None = None
        self.seen_tokens: set[str] = set()
        self.lock = threading.Lock()
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, private)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body are two writes: without this, Nagle + delayed ACK add 40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with standin.lock:
                    standin.connections += 1
                    self.number = standin.connections

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                standin.serve(self)

            do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- checks ------------------------------------------------------------------------------

    def check(self, method: str, path: str, authorization: str | None) -> tuple[Any, Any, str | None]:
        """(claims, JOSE header, problem or None) for one request, as TalkJS would judge it."""
        if not path.startswith(f"/v1/{self.app_id}/"):
            return None, None, "path does not start with /v1/<the app id>/"
        if authorization is None or not authorization.startswith("Bearer "):
            return None, None, "no bearer token"
        token = authorization[len("Bearer ") :]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.key,
                algorithms=["HS256"],
                issuer=self.app_id,
                options={"require": ["exp", "iat", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return None, None, f"token rejected: {type(exc).__name__}"
        if set(claims) != CLAIMS:
            return claims, header, f"claims are {sorted(claims)}, not exactly {sorted(CLAIMS)}"
        if claims["tokenType"] != "app":
            return claims, header, "tokenType is not app"
        if not isinstance(claims["iat"], int) or claims["exp"] - claims["iat"] > self.max_lifetime:
            return claims, header, "token lives too long"
        if header.get("alg") != "HS256" or header.get("typ") != "JWT":
            return claims, header, "unexpected JOSE header"
        with self.lock:
            if token in self.seen_tokens:
                return claims, header, "token seen before"
            self.seen_tokens.add(token)
        return claims, header, None

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._serve(handler)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        claims, header, problem = self.check(
            handler.command, handler.path, handler.headers.get("Authorization")
        )
        with self.lock:
            action = self.script.popleft() if self.script and problem is None else Action()
        self.received.append(
            Received(
                method=handler.command,
                path=handler.path,
                headers={k.lower(): v for k, v in handler.headers.items()},
                body=body,
                claims=claims,
                header=header,
                problem=problem,
                connection=getattr(handler, "number", 0),
                at=time.time(),
            )
        )
        if problem is not None:
            self._answer(
                handler, 401, json.dumps({"errorCode": "UNAUTHORIZED", "reasons": [problem]}).encode()
            )
            return
        delay = action.delay or (self.delay_for(handler.path) if self.delay_for else 0.0)
        if delay:
            time.sleep(delay)
        if action.reset:
            sock = handler.connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            sock.close()
            return
        answer = action.body
        if answer is None:
            answer = json.dumps({"ok": True, "method": handler.command, "path": handler.path}).encode()
        self._answer(handler, action.status, answer, action.headers)

    @staticmethod
    def _answer(
        handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    # -- for assertions ----------------------------------------------------------------------

    def problems(self) -> list[str]:
        return [r.problem for r in self.received if r.problem is not None]
