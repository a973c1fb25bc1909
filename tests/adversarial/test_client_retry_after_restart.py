"""The client never sends a proxied POST (or PATCH) twice (review).

Both clients retried a request once on a fresh connection when a kept-alive one was closed with no
answer at all: right for keyd closing an idle connection, wrong when keyd had already read the
request and forwarded it. That is what a restart does to a proxied call in flight (keyd's shutdown
closes connections whose answer is still pending after ``shutdown_timeout``; with socket
activation the retry then reaches the new keyd): the message was posted to TalkJS twice, though
the REST proxy promises a POST is never sent twice. Now the retry is for keyd's own endpoints and
idempotent REST methods (GET, PUT, DELETE) only; a POST or PATCH gets ``Unreachable``.

keyd here is a stand-in on a real Unix socket that behaves like a keyd stopping mid-call: it
answers the first request on a connection, reads the second and closes without answering.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyd.client import AsyncKeydClient, KeydClient, Unreachable

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Keyd-Upstream: talkjs\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


class StoppingKeyd:
    """Answers the first request of each connection; reads the second and closes unanswered."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[bytes] = []  # request lines received, every connection
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(path)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            for answered in (True, False):
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests.append(head.split(b"\r\n", 1)[0])
                if answered:
                    conn.sendall(ANSWER)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def keyd(tmp_path: Path) -> Iterator[StoppingKeyd]:
    server = StoppingKeyd(str(tmp_path / "keyd.sock"))
    yield server
    server.close()


def _posts(server: StoppingKeyd) -> int:
    return sum(1 for line in server.requests if line.startswith(b"POST /v1/rest/"))


def test_the_sync_client_does_not_send_a_proxied_post_twice(keyd: StoppingKeyd) -> None:
    with KeydClient(keyd.path) as client:
        assert client.rest("GET", "/users/alice").status == 200  # the connection is now reused
        with pytest.raises(Unreachable):
            client.rest("POST", "/conversations/c1/messages", json=[{"text": "hi", "type": "SystemMessage"}])
    assert _posts(keyd) == 1, keyd.requests
    # Positive control: an idempotent call is retried on a fresh connection, as before.
    with KeydClient(keyd.path) as client:
        assert client.rest("GET", "/users/alice").status == 200
        assert client.rest("PUT", "/users/alice", json={"name": "A"}).status == 200
    assert keyd.requests[-2:] == [b"PUT /v1/rest/default/users/alice HTTP/1.1"] * 2


def test_the_async_client_does_not_send_a_proxied_post_twice(keyd: StoppingKeyd) -> None:
    async def run() -> None:
        client = AsyncKeydClient(keyd.path)
        try:
            assert (await client.rest("GET", "/users/alice")).status == 200
            with pytest.raises(Unreachable):
                await client.rest("PATCH", "/conversations/c1/messages/m1", json={"text": "edited"})
            assert (await client.rest("GET", "/users/alice")).status == 200
            assert (await client.rest("DELETE", "/users/alice/sessions")).status == 200
        finally:
            await client.close()

    asyncio.run(run())
    patches = [line for line in keyd.requests if line.startswith(b"PATCH")]
    assert len(patches) == 1, keyd.requests
    deletes = [line for line in keyd.requests if line.startswith(b"DELETE")]
    assert len(deletes) == 2  # retried: idempotent
