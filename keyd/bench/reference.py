"""The reference server: a bare asyncio + httptools + uvloop token server, the ceiling for any
Python token server on this machine. It reads ``user_id`` from the JSON body and returns an HS256
token built from a precomputed header; ``keyd bench --compare`` runs it as its own process and
``--inprocess`` feeds its connection object directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import signal
import time
from typing import Any

from keyd.bench.workload import APP_ID, HEADER_B64, TOKEN_TTL, b64url


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
        message = HEADER_B64 + b64url(payload.encode())
        mac = self.mac.copy()
        mac.update(message)
        body = b'{"token":"' + message + b"." + b64url(mac.digest()) + b'"}'
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
