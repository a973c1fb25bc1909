"""A small client for keyd's socket API, for Python backends and for keyd's own commands.

    from keyd.client import KeydClient
    token = KeydClient("/run/keyd/keyd.sock").user_token("alice")

Errors raise ``keyd.errors.ClientError`` carrying the HTTP status and the API's error code.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from keyd.errors import ClientError

DEFAULT_SOCKET = "/run/keyd/keyd.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("keyd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class KeydClient:
    """Synchronous client; keeps one keep-alive connection and reconnects when it drops."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> KeydClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; (status, decoded JSON). Raises ClientError when keyd is unreachable."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                response = self._conn.getresponse()
                raw = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.close()
                if attempt == 2:
                    raise ClientError(
                        0, "unreachable", f"keyd at {self.socket_path} closed the connection"
                    ) from None
            except FileNotFoundError:
                self.close()
                raise ClientError(0, "unreachable", f"no keyd socket at {self.socket_path}") from None
            except PermissionError:
                self.close()
                raise ClientError(0, "unreachable", f"permission denied opening {self.socket_path}") from None
            except OSError as exc:
                self.close()
                raise ClientError(
                    0, "unreachable", f"cannot reach keyd at {self.socket_path}: {exc.strerror or exc}"
                ) from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise ClientError(response.status, "bad_response", "keyd answered with invalid JSON") from None
        return response.status, data

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        status, data = self.request(
            "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        return _checked(status, data)

    def token(self, **payload: Any) -> dict[str, Any]:
        """POST /v1/tokens with the given fields; returns the whole response document."""
        return self._post("/v1/tokens", {k: v for k, v in payload.items() if v is not None})

    def user_token(self, user_id: str, ttl: int | None = None, app: str | None = None) -> str:
        return str(self.token(user_id=user_id, ttl=ttl, app=app)["token"])

    def app_token(self, ttl: int | None = None, app: str | None = None) -> str:
        return str(self.token(type="app", ttl=ttl, app=app)["token"])

    def health(self) -> tuple[int, dict[str, Any]]:
        return self.request("GET", "/v1/health")


def _checked(status: int, data: dict[str, Any]) -> dict[str, Any]:
    if status == 200:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        raise ClientError(status, str(error.get("code", "error")), str(error.get("message", "")))
    raise ClientError(status, "error", f"keyd answered {status}")
