"""A fast HTTPS stand-in for TalkJS's REST API, for ``keyd bench --rest`` (run as its own process).

asyncio + httptools + TLS, like the bench's reference server: it checks each request's bearer token
(HS256 with the app's key, exactly the claims ``tokenType``/``iss``/``iat``/``exp``, an app token
for this app, not expired, at most ``max_lifetime`` seconds long) and that the path starts with
``/v1/<app id>/``, then answers 200 ``{"ok":true}``, or 401. ``?delay_ms=N`` answers N ms later (a
slow TalkJS). ``keyd dev`` runs it too (``StandinProcess``), with a log of what it answered so a
developer sees what "TalkJS" received. The tests have a stricter, scriptable stand-in of their own
(tests/talkjs_standin.py).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import datetime
import hmac
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httptools

from keyd.errors import KeydError

_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
_DENIED = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_CLAIMS = {"tokenType", "iss", "iat", "exp"}


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost: (ca.pem, cert, key)."""
    from cryptography import x509  # noqa: PLC0415 - only the bench and tests make certificates
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyd stand-in CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "talkjs stand-in")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    ca_path.chmod(0o644)
    return ca_path, cert_path, key_path


def _unb64(part: bytes) -> bytes:
    return binascii.a2b_base64(part.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(part) % 4))


class Checker:
    """Judges a request as TalkJS would: a valid app token for this app on this app's path."""

    def __init__(self, key: bytes, app_id: str, max_lifetime: int) -> None:
        self.key = key
        self.app_id = app_id
        self.prefix = f"/v1/{app_id}/".encode()
        self.max_lifetime = max_lifetime

    def ok(self, path: bytes, authorization: bytes | None) -> bool:
        if (
            not path.startswith(self.prefix)
            or authorization is None
            or not authorization.startswith(b"Bearer ")
        ):
            return False
        try:
            head, payload, signature = authorization[7:].split(b".")
            expected = hmac.new(self.key, head + b"." + payload, "sha256").digest()
            if not hmac.compare_digest(expected, _unb64(signature)):
                return False
            header = json.loads(_unb64(head))
            claims = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            return False
        return (
            header.get("alg") == "HS256"
            and set(claims) == _CLAIMS
            and claims["tokenType"] == "app"
            and claims["iss"] == self.app_id
            and isinstance(claims["iat"], int)
            and claims["exp"] >= time.time()
            and claims["exp"] - claims["iat"] <= self.max_lifetime
        )


class _Connection(asyncio.Protocol):
    def __init__(self, checker: Checker, loop: asyncio.AbstractEventLoop, log: IO[str] | None) -> None:
        self.checker = checker
        self.loop = loop
        self.log = log
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.authorization: bytes | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.authorization = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.authorization = value

    def on_message_complete(self) -> None:
        path, _, query = self.url.partition(b"?")
        answer = _OK if self.checker.ok(path, self.authorization) else _DENIED
        if self.log is not None:  # keyd dev's: one line per request (the token is never written)
            method = self.parser.get_method().decode("ascii", "replace")
            line = f"{method} {path.decode('ascii', 'replace')} -> {200 if answer is _OK else 401}\n"
            self.log.write(line)
            self.log.flush()
        delay = 0.0
        if query.startswith(b"delay_ms="):
            delay = int(query[9:]) / 1000.0
        if delay:
            self.loop.call_later(delay, self._write, answer)
        else:
            self.transport.write(answer)

    def _write(self, answer: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(answer)


async def serve(
    port_file: str,
    cert: str,
    private: str,
    key: bytes,
    app_id: str,
    max_lifetime: int,
    log: IO[str] | None = None,
) -> None:
    """Serve on a free port of 127.0.0.1; the port is written to ``port_file`` once listening."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, private)
    loop = asyncio.get_running_loop()
    checker = Checker(key, app_id, max_lifetime)
    server = await loop.create_server(
        lambda: _Connection(checker, loop, log), "127.0.0.1", 0, ssl=context, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    partial = Path(port_file + ".tmp")
    partial.write_text(str(port))
    partial.replace(port_file)  # whoever polls port_file sees all of it or nothing
    await asyncio.Event().wait()


class StandinProcess:
    """The stand-in as a child process, for ``keyd bench --rest`` and ``keyd dev``.

    ``start()`` makes a CA and certificate in ``directory``, hands the key over standard input and
    waits for the port; ``url`` and ``ca`` are then what keyd's ``[apps.NAME.rest]`` needs. ``stop()``
    ends this one process (by its own handle, never by name).
    """

    def __init__(
        self, directory: Path, key: bytes, app_id: str, max_lifetime: int, log_file: Path | None = None
    ) -> None:
        self.directory = directory
        self.key = key
        self.app_id = app_id
        self.max_lifetime = max_lifetime
        self.log_file = log_file
        self.ca = directory / "ca.pem"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> StandinProcess:
        self.ca, cert, private = make_certificates(self.directory)
        port_file = self.directory / "standin.port"
        args = [sys.executable, "-m", "keyd.bench.standin", str(port_file), str(cert), str(private)]
        args += [self.app_id, str(self.max_lifetime)]
        if self.log_file is not None:
            args.append(str(self.log_file))
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, cwd=self.directory)
        assert self.process.stdin is not None  # noqa: S101 - set by stdin=PIPE
        self.process.stdin.write(self.key + b"\n")  # never on the command line, where ps would show it
        self.process.stdin.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):  # not written (completely) yet
                self.port = int(port_file.read_text())
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise KeydError("the TalkJS stand-in did not start")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> StandinProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """``python -m keyd.bench.standin PORT_FILE CERT KEY APP_ID MAX_LIFETIME [LOG_FILE]``; the secret
    on stdin."""
    port_file, cert, private, app_id, lifetime = sys.argv[1:6]
    key = sys.stdin.buffer.readline().strip()  # never on the command line, where ps would show it
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(sys.argv[6], "a", encoding="utf-8")) if len(sys.argv) > 6 else None
        server = serve(port_file, cert, private, key, app_id, int(lifetime), log)
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            asyncio.run(server)
        else:
            uvloop.run(server)


if __name__ == "__main__":
    main()
