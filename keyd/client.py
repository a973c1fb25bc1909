"""A small client for keyd's socket API, for Python backends and for keyd's own commands.

    from keyd.client import KeydClient
    client = KeydClient("/run/keyd/keyd.sock")
    token = client.user_token("alice")

    from keyd.client import AsyncKeydClient
    async with AsyncKeydClient("/run/keyd/keyd.sock") as client:
        token = await client.user_token("alice")

Both keep keep-alive connections open and reconnect once when keyd closed an idle one. Errors are
``ClientError`` subclasses carrying the HTTP status and the API's error code:

- ``Unreachable``: no socket, permission denied, connection refused or reset, timeout (status 0);
- ``InvalidRequest``: any other 4xx: a malformed or invalid request, an unknown app (400/404/405/413/415/422, ...);
- ``ForbiddenError``: 403, no grant allows this caller that request;
- ``RateLimitedError``: 429, the caller's grant rate is used up;
- ``WebhookRejected``: 401 from the webhook check (only if you call ``request`` yourself);
- ``Unavailable``: 5xx; its subclass ``KeyUnavailableError`` (503 ``key_unavailable``) means the key is
  not loaded or could not be refreshed for longer than ``refresh.max_stale``.

``rest(method, path, json=...)`` calls TalkJS's REST API through keyd's proxy (a grant with type
``rest`` must list the endpoint): it returns a ``RestResponse`` for whatever TalkJS answered, 4xx and
5xx included, and raises the errors above for keyd's own refusals (403 ``forbidden`` is ``ForbiddenError``,
429 ``too_many_requests`` is ``RateLimitedError``, 502 ``upstream_error`` and 504 ``upstream_timeout`` are
``Unavailable``).

``verify_webhook`` returns True for an authentic, fresh webhook and False for one keyd judges not
authentic (wrong signature, stale or malformed timestamp, missing header): reject that request.
Everything that says nothing about the webhook itself (keyd unreachable, no grant, unknown app,
key unavailable) raises, so a webhook endpoint answers 5xx and TalkJS retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import http.client
import json
import os
import pwd
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from keyd import http1
from keyd.errors import ClientError

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncKeydClient",
    "ClientError",
    "ForbiddenError",
    "InvalidRequest",
    "KeyUnavailableError",
    "KeydClient",
    "RateLimitedError",
    "RestResponse",
    "Unavailable",
    "Unreachable",
    "WebhookRejected",
]

DEFAULT_SOCKET = "/run/keyd/keyd.sock"


def default_socket() -> str:
    """$KEYD_SOCKET when set (what `keyd dev` prints to export), else DEFAULT_SOCKET."""
    return os.environ.get("KEYD_SOCKET") or DEFAULT_SOCKET
WEBHOOK_HEADERS = ("X-TalkJS-Timestamp", "X-TalkJS-Signature")
# The answers that mean "this webhook is not authentic": verify_webhook returns False for them.
WEBHOOK_REJECTIONS = frozenset({"invalid_signature", "stale_timestamp", "missing_header", "invalid_header"})
MAX_RESPONSE = 1 << 20
MAX_REST_RESPONSE = 8 << 20  # keyd's default rest.max_response_body
REST_TIMEOUT = 35.0  # above the proxy's default total timeout (15 s), with room for a larger one
_UPSTREAM = "x-keyd-upstream"


@dataclass(frozen=True)
class RestResponse:
    """What TalkJS answered to a proxied call: status, raw body, Content-Type and Retry-After."""

    status: int
    body: bytes
    content_type: str
    retry_after: str | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body decoded as JSON (None for an empty body); ValueError when it is not JSON."""
        return json.loads(self.body) if self.body else None


def _rest_request(
    method: str, path: str, json_body: Any, app: str | None
) -> tuple[str, bytes | None, dict[str, str]]:
    """The socket path, body and headers of a proxied call; ``path`` is TalkJS's, below /v1/APP_ID."""
    if not path.startswith("/"):
        raise ValueError("path must start with /, e.g. /users/alice")
    url = f"/v1/rest/{quote(app or 'default', safe='')}{path}"
    headers = {"Accept": "application/json"}
    body = None
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    return url, body, headers


def _retry_safe(method: str) -> bool:
    """Whether a proxied call may be sent again when its connection closed without an answer.

    Not a POST or PATCH: keyd may already have forwarded it (a restart closes calls in flight),
    and TalkJS would get it twice. keyd's own endpoints and GET, PUT, DELETE may."""
    return method.upper() in ("GET", "PUT", "DELETE")


def _rest_answer(status: int, headers: Mapping[str, str], raw: bytes) -> RestResponse:
    if headers.get(_UPSTREAM) != "talkjs":  # keyd's own answer: an error document
        checked(status, _decode(status, raw))
    return RestResponse(status, raw, headers.get("content-type", ""), headers.get("retry-after"))


class Unreachable(ClientError):
    """keyd cannot be reached: no socket, no permission, refused, reset, timed out, or a bad answer."""


class InvalidRequest(ClientError):
    """keyd rejected the request itself (400, 404, 405, 413, 415, 422): fix the request."""


class ForbiddenError(ClientError):
    """403: no grant allows this caller (its uid, group or unit) to make this request."""


class RateLimitedError(ClientError):
    """429: the caller's grant rate is used up; slow down."""


class WebhookRejected(ClientError):
    """401 from POST /v1/webhooks/verify: the webhook is not authentic or not fresh."""


class Unavailable(ClientError):
    """5xx: keyd cannot answer right now (shutting down, at its connection limit, internal error)."""


class KeyUnavailableError(Unavailable):
    """503 key_unavailable: the app's key is not loaded, or is past refresh.max_stale."""


def error_for(status: int, code: str, message: str) -> ClientError:
    """The ClientError subclass for an error answer."""
    cls: type[ClientError]
    if status == 0:
        cls = Unreachable
    elif status == 401:
        cls = WebhookRejected
    elif status == 403:
        cls = ForbiddenError
    elif status == 429:
        cls = RateLimitedError
    elif code == "key_unavailable":
        cls = KeyUnavailableError
    elif status >= 500:
        cls = Unavailable
    elif status >= 400:
        cls = InvalidRequest
    else:
        cls = ClientError
    return cls(status, code, message)


def checked(status: int, data: Any) -> dict[str, Any]:
    """The response document of a 200, or the matching ClientError raised."""
    if status == 200 and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        raise error_for(status, str(error.get("code", "error")), str(error.get("message", "")))
    raise error_for(status, "bad_response", f"keyd answered {status} without an error document")


def _decode(status: int, raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise Unavailable(status, "bad_response", "keyd answered with invalid JSON") from None


def _payload(**fields: Any) -> bytes:
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


def _webhook_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The two TalkJS headers from the incoming request's headers, looked up case-insensitively.

    A value no HTTP sender could have sent (non-ASCII, CR, LF, NUL) is left out, so keyd answers
    missing_header and the webhook is judged not authentic.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    out = {"Content-Type": "application/json"}
    for name in WEBHOOK_HEADERS:
        value = lowered.get(name.lower())
        if isinstance(value, str) and http1.safe(value):
            out[name] = value
    return out


def _webhook_path(app: str | None) -> str:
    return "/v1/webhooks/verify" + (f"?app={quote(app, safe='')}" if app is not None else "")


def _unreachable(path: str, exc: OSError) -> Unreachable:
    if isinstance(exc, FileNotFoundError):
        return Unreachable(0, "unreachable", f"no keyd socket at {path}")
    if isinstance(exc, PermissionError):
        return Unreachable(0, "unreachable", f"permission denied opening {path}: {access_hint(path)}")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(0, "unreachable", f"nothing is listening on {path} (is keyd running?)")
    if isinstance(exc, TimeoutError):
        return Unreachable(0, "unreachable", f"keyd at {path} did not answer in time")
    return Unreachable(0, "unreachable", f"cannot reach keyd at {path}: {exc.strerror or type(exc).__name__}")


def access_hint(path: str) -> str:
    """What to do when connecting to ``path`` failed with EACCES, from the socket's owner, group, mode."""
    try:
        st = os.stat(path)
    except OSError:
        return (
            f"a directory on the way to it is closed to uid {os.geteuid()}; ask the administrator "
            "which group may reach keyd's socket"
        )
    try:
        group = grp.getgrgid(st.st_gid)
        name, listed = group.gr_name, set(group.gr_mem)
    except KeyError:
        name, listed = str(st.st_gid), set()
    mode = st.st_mode & 0o777
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return (
            f"you are in its group {name!r}, but its mode {mode:04o} does not let that group write to "
            'it (keyd\'s server.socket_mode should be "0660"), or a directory on the way is closed'
        )
    try:
        user = pwd.getpwuid(os.geteuid())
    except KeyError:
        return f"only its owner and group {name!r} may connect: run as a member of {name!r}"
    if user.pw_name in listed or user.pw_gid == st.st_gid:
        return (
            f"{user.pw_name} is a member of its group {name!r}, but this session started before that: "
            f"log in again (or run `newgrp {name}`)"
        )
    return (
        f"only its owner and group {name!r} may connect: ask to be added to the group "
        f"(usermod -aG {name} {user.pw_name}), then log in again"
    )


# -- synchronous --------------------------------------------------------------------------------


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
    """Synchronous client; keeps one keep-alive connection and reconnects when it drops.

    One instance is not thread-safe: give each thread its own (they are cheap).
    """

    def __init__(self, socket_path: str | None = None, timeout: float = 5.0) -> None:
        self.socket_path = socket_path or default_socket()
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
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send one request; (status, decoded JSON). Raises Unreachable when keyd cannot be reached."""
        status, _, raw = self._raw(method, path, body, headers)
        return status, _decode(status, raw)

    def rest(
        self, method: str, path: str, json: Any = None, app: str | None = None, timeout: float = REST_TIMEOUT
    ) -> RestResponse:
        """Call TalkJS's REST API through keyd: ``client.rest("PUT", "/users/alice", json={...})``.

        ``path`` is TalkJS's path below ``/v1/APP_ID``; keyd adds the app id and a token of its own.
        """
        url, body, headers = _rest_request(method, path, json, app)
        status, fields, raw = self._raw(method, url, body, headers, timeout, _retry_safe(method))
        return _rest_answer(status, fields, raw)

    def _raw(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | None = None,
        retry: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, raw body) of one exchange; ``retry``: whether a request
        on a kept-alive connection that closed without an answer may be sent again."""
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
            wait = timeout or self.timeout
            self._conn.timeout = wait
            if self._conn.sock is not None:
                self._conn.sock.settimeout(wait)
            try:
                self._conn.request(method, path, body=body, headers=dict(headers or {}))
                response = self._conn.getresponse()
                # As the async client: a known length within the limit, or no body is read at all
                # (a broken or hostile peer on the socket path must not make the caller buffer GiBs).
                limit = MAX_REST_RESPONSE if response.getheader("X-Keyd-Upstream") else MAX_RESPONSE
                if response.chunked or response.length is None or response.length > limit:
                    self.close()
                    raise Unreachable(0, "bad_response", "keyd's response has no usable Content-Length")
                raw = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                # A kept-alive connection keyd closed while idle: try once on a fresh one.
                self.close()
                if attempt == 2 or not reused or not retry:
                    raise _unreachable(self.socket_path, exc) from None
            except http.client.HTTPException:
                self.close()
                raise Unreachable(0, "bad_response", "keyd answered with a malformed HTTP response") from None
            except OSError as exc:
                self.close()
                raise _unreachable(self.socket_path, exc) from None
        fields = {name.lower(): value for name, value in response.getheaders()}
        return response.status, fields, raw

    def _post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        status, data = self.request("POST", path, body, headers or {"Content-Type": "application/json"})
        return checked(status, data)

    def token(self, **fields: Any) -> dict[str, Any]:
        """POST /v1/tokens with the given fields (None values left out); the whole response."""
        return self._post("/v1/tokens", _payload(**fields))

    def user_token(self, user_id: str, ttl: int | None = None, app: str | None = None) -> str:
        """A TalkJS user token (JWT) for ``user_id``."""
        return str(self.token(user_id=user_id, ttl=ttl, app=app)["token"])

    def app_token(self, ttl: int | None = None, app: str | None = None) -> str:
        """A TalkJS REST API token (needs a grant with type "app")."""
        return str(self.token(type="app", ttl=ttl, app=app)["token"])

    def signature(self, user_id: str, uppercase: bool = False, app: str | None = None) -> str:
        """The legacy identity-verification signature (hex HMAC-SHA256 of the user id)."""
        doc = self._post("/v1/signatures", _payload(user_id=user_id, uppercase=uppercase or None, app=app))
        return str(doc["signature"])

    def verify_webhook(self, headers: Mapping[str, str], body: bytes, app: str | None = None) -> bool:
        """True when TalkJS signed this webhook (raw ``body`` bytes exactly as received) recently.

        False when keyd says it is not authentic; raises ClientError when keyd cannot decide.
        """
        try:
            self._post(_webhook_path(app), body, _webhook_headers(headers))
        except (WebhookRejected, InvalidRequest) as exc:
            if exc.code in WEBHOOK_REJECTIONS:
                return False
            raise
        return True

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, health document); 503 is an answer here, not an error."""
        status, data = self.request("GET", "/v1/health")
        if not isinstance(data, dict):
            raise Unavailable(status, "bad_response", "keyd answered health with a non-object")
        return status, data


# -- asyncio ------------------------------------------------------------------------------------


class _Closed(Exception):
    """The server closed a reused connection before answering."""


class AsyncKeydClient:
    """asyncio client with the same methods as KeydClient (as coroutines).

    Keeps up to ``pool_size`` idle keep-alive connections; concurrent requests each take their own
    connection, so many coroutines can share one client.
    """

    def __init__(self, socket_path: str | None = None, timeout: float = 5.0, pool_size: int = 8) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self.pool_size = pool_size
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> AsyncKeydClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send one request; (status, decoded JSON). Raises Unreachable when keyd cannot be reached."""
        status, _, raw = await self._raw(method, path, body, headers)
        return status, _decode(status, raw)

    async def rest(
        self, method: str, path: str, json: Any = None, app: str | None = None, timeout: float = REST_TIMEOUT
    ) -> RestResponse:
        """Call TalkJS's REST API through keyd (see KeydClient.rest)."""
        url, body, headers = _rest_request(method, path, json, app)
        status, fields, raw = await self._raw(method, url, body, headers, timeout, _retry_safe(method))
        return _rest_answer(status, fields, raw)

    async def _raw(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | None = None,
        retry: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, raw body) of one exchange (``retry``: see KeydClient._raw)."""
        data = http1.encode_request(method, path, headers, body)
        for attempt in (1, 2):
            # The retry always takes a fresh connection: keyd closes idle ones after idle_timeout,
            # so the rest of the pool has most likely gone stale too.
            reused = attempt == 1 and bool(self._idle)
            try:
                async with asyncio.timeout(timeout or self.timeout):
                    reader, writer = self._idle.pop() if reused else await self._connect()
                    try:
                        status, fields, raw, keep = await self._exchange(reader, writer, data, reused)
                    except BaseException:
                        writer.close()
                        raise
            except _Closed:
                if attempt == 2 or not retry:
                    raise Unreachable(
                        0, "unreachable", f"keyd at {self.socket_path} closed the connection"
                    ) from None
                continue
            except TimeoutError:
                raise Unreachable(
                    0, "unreachable", f"keyd at {self.socket_path} did not answer in time"
                ) from None
            except OSError as exc:
                raise _unreachable(self.socket_path, exc) from None
            if keep and len(self._idle) < self.pool_size:
                self._idle.append((reader, writer))
            else:
                writer.close()
            return status, fields, raw
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.socket_path, limit=MAX_RESPONSE)

    @staticmethod
    async def _exchange(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, reused: bool
    ) -> tuple[int, dict[str, str], bytes, bool]:
        """Write one request, read one response: (status, headers, body, whether it stays open)."""
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readuntil(http1.HEAD_END)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            nothing = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
            if reused and nothing:
                raise _Closed from None
            raise ConnectionResetError("keyd closed the connection mid-answer") from None
        except asyncio.LimitOverrunError:
            raise Unreachable(0, "bad_response", "keyd's response head is too large") from None
        head = head[: -len(http1.HEAD_END)]
        try:
            response = http1.parse_response_head(head)
        except http1.MalformedResponse:
            raise Unreachable(0, "bad_response", "keyd answered with a malformed HTTP response") from None
        fields: dict[str, str] = {}  # lower-cased; the REST proxy's answers need Content-Type, Retry-After
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields.setdefault(name.strip().lower(), value.strip())
        length = response.length
        limit = MAX_REST_RESPONSE if _UPSTREAM in fields else MAX_RESPONSE
        if length is None or length == http1.CHUNKED or length > limit:
            raise Unreachable(0, "bad_response", "keyd's response has no usable Content-Length")
        try:
            raw = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("keyd closed the connection mid-answer") from None
        return response.status, fields, raw, response.keep_alive

    async def _post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        status, data = await self.request("POST", path, body, headers or {"Content-Type": "application/json"})
        return checked(status, data)

    async def token(self, **fields: Any) -> dict[str, Any]:
        """POST /v1/tokens with the given fields (None values left out); the whole response."""
        return await self._post("/v1/tokens", _payload(**fields))

    async def user_token(self, user_id: str, ttl: int | None = None, app: str | None = None) -> str:
        """A TalkJS user token (JWT) for ``user_id``."""
        return str((await self.token(user_id=user_id, ttl=ttl, app=app))["token"])

    async def app_token(self, ttl: int | None = None, app: str | None = None) -> str:
        """A TalkJS REST API token (needs a grant with type "app")."""
        return str((await self.token(type="app", ttl=ttl, app=app))["token"])

    async def signature(self, user_id: str, uppercase: bool = False, app: str | None = None) -> str:
        """The legacy identity-verification signature (hex HMAC-SHA256 of the user id)."""
        body = _payload(user_id=user_id, uppercase=uppercase or None, app=app)
        return str((await self._post("/v1/signatures", body))["signature"])

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes, app: str | None = None) -> bool:
        """True when TalkJS signed this webhook recently; False when not; raises when keyd cannot tell."""
        try:
            await self._post(_webhook_path(app), body, _webhook_headers(headers))
        except (WebhookRejected, InvalidRequest) as exc:
            if exc.code in WEBHOOK_REJECTIONS:
                return False
            raise
        return True

    async def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, health document); 503 is an answer here, not an error."""
        status, data = await self.request("GET", "/v1/health")
        if not isinstance(data, dict):
            raise Unavailable(status, "bad_response", "keyd answered health with a non-object")
        return status, data
