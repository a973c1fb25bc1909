"""A minimal TalkJS backend on keyd in Python (standard library + keyd.client).

GET /talkjs-token returns a user token for the logged-in user (TalkJS's ``tokenFetcher`` calls it);
POST /talkjs-webhook checks a TalkJS webhook through keyd. Run:

    KEYD_SOCKET=/run/keyd/keyd.sock PORT=3000 python backend.py

The demo "sessions" come from $DEMO_SESSIONS ({"cookie value": "user id"}) and $DEMO_BANNED
(["user id", ...]); replace ``current_user`` with your framework's session lookup. With asyncio
frameworks use ``keyd.client.AsyncKeydClient``, which has the same methods as coroutines.
"""

from __future__ import annotations

import json
import os
import threading
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from keyd.client import ClientError, KeydClient

SOCKET = os.environ.get("KEYD_SOCKET", "/run/keyd/keyd.sock")
SESSIONS: dict[str, str] = json.loads(os.environ.get("DEMO_SESSIONS", "{}"))
BANNED = set(json.loads(os.environ.get("DEMO_BANNED", "[]")))
_local = threading.local()


def keyd() -> KeydClient:
    """One client (one keep-alive connection) per server thread."""
    if not hasattr(_local, "client"):
        _local.client = KeydClient(SOCKET)
    client: KeydClient = _local.client
    return client


class Handler(BaseHTTPRequestHandler):
    def current_user(self) -> str | None:
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        session = cookie.get("session")
        return SESSIONS.get(session.value) if session is not None else None

    def send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path != "/talkjs-token":
            return self.send(404, b"not found\n")
        user = self.current_user()
        # Never mint a token for someone who is not logged in, or who is banned: a token is a login.
        if user is None:
            return self.send(401, b"not logged in\n")
        if user in BANNED:
            return self.send(403, b"banned\n")
        try:
            token = keyd().user_token(user)
        except ClientError as exc:
            self.log_message("keyd refused a token: %s (%s)", exc.code, exc.status)
            return self.send(503, b"chat is unavailable right now\n")
        return self.send(200, token.encode())

    def do_POST(self) -> None:
        if self.path != "/talkjs-webhook":
            return self.send(404, b"not found\n")
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))  # the exact bytes
        try:
            valid = keyd().verify_webhook(dict(self.headers.items()), raw)
        except ClientError as exc:
            self.log_message("keyd could not check a webhook: %s (%s)", exc.code, exc.status)
            return self.send(503, b"try again\n")  # TalkJS retries once
        if not valid:
            return self.send(401, b"invalid webhook\n")
        event = json.loads(raw)
        # ... handle event["type"] here ...
        return self.send(200, json.dumps({"received": event.get("type")}).encode(), "application/json")


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "3000"))), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
