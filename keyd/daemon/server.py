"""The Unix socket: bind or inherit, permissions, HTTP/1.1 parsing, limits, graceful shutdown.

A bare asyncio protocol on httptools (the fastest option measured, see docs/design.md). Each request
is handled synchronously inside ``data_received``: signing is pure CPU work of a few microseconds, so
there is nothing to await, responses stay in order for pipelined requests, and no task is created
per request. ``POST /v1/tokens`` goes straight to ``Api.issue``; everything else becomes a
``Request`` for the generic handler. Answers are queued and written once per event-loop pass
(``Server.flush``). Timeouts are enforced by one sweeper task rather than a timer per request;
each deadline is taken from the real clock when the bytes it is about arrive, so it never fires early.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import secrets
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import httptools

from keyd.config import ServerConfig
from keyd.daemon.api import Deferred, Request, Response, error_body
from keyd.daemon.peers import Caller, Identities
from keyd.daemon.safefiles import check_directory
from keyd.errors import StartupError

log = logging.getLogger("keyd.server")

MAX_HEADER_BYTES = 16384
_MAX_SUN_PATH = 107  # sockaddr_un.sun_path, less its terminating NUL
LINGER_SECONDS = 1.0  # after a 413: how long to discard the rest of an oversized body
CLOSE_GRACE = 1.0  # after closing: how long a peer that reads nothing may keep its connection
MAX_HELD = 64  # answers held behind a deferred one before the connection stops reading
# On shutdown: how long requests already sent (or arriving) are still read and answered with
# "Connection: close" before idle connections get an EOF (Server.shutdown).
DRAIN_SECONDS = 0.1
_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def _raw_response(status: int, code: str, message: str) -> bytes:
    """An error answer that closes the connection."""
    body = error_body(code, message)
    return (
        _STATUS[status]
        + b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )


_TOO_MANY = _raw_response(503, "too_many_connections", "keyd is at its connection limit; retry shortly")
_TOO_MANY_FOR_UID = _raw_response(
    503,
    "too_many_connections",
    "this user holds as many connections to keyd as server.max_connections_per_uid allows; "
    "reuse or close one",
)
_SHUTTING_DOWN = _raw_response(503, "shutting_down", "keyd is shutting down")


def _resolve_group(group: str) -> int:
    if not group:
        return -1
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"server.socket_group: no group named {group!r}") from None


def bind_socket(config: ServerConfig) -> tuple[socket.socket, int]:
    """Bind a listening Unix socket at config.socket with its mode and group; (socket, inode).

    The directory must be one no other user can change (safefiles.check_directory). A stale socket
    file (nobody listening) of keyd's user or root is replaced; a live one makes this fail, so two
    daemons never fight over one path. The socket is bound inside a fresh private 0700 directory,
    given its group and mode there (no other user can swap that name for a symlink while keyd
    chowns and chmods it: both follow symlinks on a socket path), then renamed into place: it is
    never reachable with looser permissions, and no name another user controls is ever followed.
    """
    path = config.socket
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    check_directory("server.socket", directory)
    gid = _resolve_group(config.socket_group)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replaceable(path, name, dir_fd)
        private = f".kd{secrets.token_hex(4)}"
        try:
            os.mkdir(private, 0o700, dir_fd=dir_fd)
        except OSError as exc:
            raise StartupError(
                f"server.socket: cannot create a directory in {directory!r}: {exc.strerror}"
            ) from None
        inner = f"{private}/s"
        bind_path = os.path.join(directory, inner)
        if len(bind_path.encode()) > _MAX_SUN_PATH:  # the directory through its descriptor: shorter
            bind_path = f"/proc/self/fd/{dir_fd}/{inner}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(bind_path)
            if gid >= 0:
                os.chown(inner, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(inner, config.socket_mode, dir_fd=dir_fd)  # inside keyd's own 0700 directory
            os.rename(inner, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            inode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(inner, dir_fd=dir_fd)
            raise StartupError(f"server.socket: cannot create {path!r}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
            with contextlib.suppress(OSError):
                os.rmdir(private, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    sock.listen(4096)
    sock.setblocking(False)
    return sock, inode


def _replaceable(path: str, name: str, dir_fd: int) -> None:
    """Raise StartupError unless nothing is at ``path`` or a stale socket of keyd's user or root."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"server.socket: {path!r} exists and is not a socket; not replacing it")
    if st.st_uid not in (0, os.geteuid()):
        raise StartupError(
            f"server.socket: {path!r} is a socket of uid {st.st_uid}, not of keyd's user or root; "
            "another user may have planted it: remove it and keep the directory private"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"server.socket: cannot probe {path!r}: {exc.strerror}") from None
        log.info("replacing stale socket file %s", path)
    else:
        raise StartupError(f"server.socket: another process is already serving on {path!r}")
    finally:
        probe.close()


def _call_now(callback: Callable[[], None]) -> None:
    """Server.call_soon before start(): no loop to defer to, so answers are written at once."""
    callback()


class _Abort(Exception):
    """Stop parsing this connection: a response has been written and it will be closed."""


class _SealedHeaders(dict[bytes, bytes]):
    """A request's headers once they are complete: chunked trailers arrive through on_header too,
    and must not add to or replace them (a trailer could otherwise set X-TalkJS-Signature or
    Content-Type after the fact). Writes are ignored; reads are a plain dict's."""

    def __setitem__(self, key: bytes, value: bytes) -> None:
        return None


class Connection(asyncio.Protocol):
    """One client connection; parses requests with httptools and answers them in order."""

    __slots__ = (
        "_body",
        "_header_bytes",
        "_headers",
        "_url",
        "busy",
        "caller",
        "deadline",
        "held",
        "parser",
        "received",
        "server",
        "transport",
        "uid",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: Any = None
        self.parser: Any = None
        self.caller: Caller | None = None
        # True from the first byte of a request until it is answered.
        self.busy = False
        self.deadline = 0.0
        self.received = 0.0  # the clock when data_received last ran
        self.uid: int | None = None  # counted in server.uid_connections while set
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: bytes | bytearray = b""
        # Answers waiting behind a deferred one (see _defer); None while there is none.
        self.held: deque[Any] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        if server.stopped:
            transport.write(_SHUTTING_DOWN)
            transport.close()
            return
        if len(server.connections) >= server.config.max_connections:
            server.refused_connections += 1
            transport.write(_TOO_MANY)
            transport.close()
            return
        try:
            self.caller, known = server.identities.identify(transport.get_extra_info("socket"))
        except OSError:
            transport.close()
            return
        if not server.admit(self, self.caller.uid):
            transport.write(_TOO_MANY_FOR_UID)
            transport.close()
            return
        self.parser = httptools.HttpRequestParser(self)
        # A fresh connection must start its request soon: holding idle slots costs a caller this.
        self.deadline = server.now() + server.first_byte_timeout
        if not known:
            # A uid keyd has not seen: its names are looked up in a worker thread (NSS may block),
            # and only this connection waits for them.
            transport.pause_reading()
            server.identities.when_named(self.caller, self._named)

    def _named(self, caller: Caller) -> None:
        self.caller = caller
        if self.parser is not None and not self.transport.is_closing():
            if not self.busy:  # the first-byte deadline counts from when keyd starts reading
                self.deadline = self.server.now() + self.server.first_byte_timeout
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.uid is not None:
            self.server.release(self)
        self.parser = None
        held, self.held = self.held, None
        for item in held or ():
            if isinstance(item, tuple):
                item[0].cancel()  # nobody will read the answer

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        server = self.server
        # One clock read per read: the deadlines this data starts are measured from when it
        # arrived, never from an older time (a stalled loop must not make them fire early).
        self.received = now = server.now()
        if not self.busy:
            self.busy = True
            self.deadline = now + server.request_timeout
        try:
            self.parser.feed_data(data)
        except _Abort:
            pass
        except httptools.HttpParserCallbackError as exc:
            # httptools wraps whatever a callback raised; _Abort means "already answered".
            if not isinstance(exc.__context__, _Abort):
                log.error("internal error while parsing a request: %s", type(exc.__context__).__name__)
                self._reject(500, "internal_error", "keyd hit an internal error")
        except httptools.HttpParserUpgrade:
            self._reject(400, "bad_request", "protocol upgrades are not supported")
        except httptools.HttpParserError:
            self._reject(400, "bad_request", "malformed HTTP request")

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if not self.busy:
            # A pipelined request that began in the same read as the previous one's end.
            self.busy = True
            self.deadline = self.received + self.server.request_timeout
        # Per-request state is reset when a request is answered (_reset), so no on_message_begin
        # callback is needed; b"" + url is url itself, no copy.
        self._url += url
        if len(self._url) > 8192:
            self._fail(414, "uri_too_long", "the request URL is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._fail(431, "headers_too_large", "the request headers are too large")
        headers = self._headers
        key = name.lower()
        if key in headers:
            # A repeated field is one comma-separated list (RFC 9110 5.3): "Transfer-Encoding: gzip"
            # then "Transfer-Encoding: chunked" must read as "gzip, chunked", not as the last one.
            value = headers[key] + b", " + value
        headers[key] = value

    def on_headers_complete(self) -> None:
        headers = self._headers
        if b"transfer-encoding" in headers:
            if headers[b"transfer-encoding"].strip().lower() != b"chunked":
                self._fail(
                    501,
                    "unsupported_transfer_encoding",
                    "only Transfer-Encoding: chunked is supported (no other coding)",
                )
            self._headers = _SealedHeaders(headers)  # trailers, if any, are ignored
        length = headers.get(b"content-length")
        # Fewer digits than max_body has cannot exceed it: the usual case skips int().
        if (
            length is not None
            and len(length) >= self.server.max_body_digits
            and length.isdigit()
            and int(length) > self.server.max_body
            and int(length) > self._body_limit()
        ):
            self._too_large()
        if (
            b"expect" in headers
            and headers[b"expect"].lower() == b"100-continue"
            and self.parser.get_http_version() != "1.0"
        ):
            # curl sends this for bodies over 1 KiB (a forwarded webhook) and otherwise waits a
            # second before sending the body. An HTTP/1.0 client knows no 1xx answers: RFC 9110
            # 10.1.1 says to ignore the expectation there.
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        # bytes + bytes with an empty left side returns the right side itself: no copy for the
        # usual one-piece body. A body in pieces (bounded by max_body) grows in a bytearray:
        # bytes + bytes copies all received so far for every piece, which made a REST-sized body
        # sent in small pieces on a few dozen connections stall the loop (token signing with it).
        if not self._body:
            self._body = body
        elif self._body.__class__ is bytes:
            self._body = bytearray(self._body) + body
        else:
            self._body += body
        if len(self._body) > self.server.max_body and len(self._body) > self._body_limit():
            self._too_large()

    def on_message_complete(self) -> None:
        server = self.server
        url = self._url
        caller = self.caller
        assert caller is not None  # noqa: S101 - set in connection_made before parsing
        body = self._body
        if isinstance(body, bytearray):  # gathered from pieces (on_body)
            body = bytes(body)
        if caller.expires < self.received:  # bounded by the identity cache time: resolved again
            caller = self.caller = server.identities.refresh(caller, self.transport.get_extra_info("socket"))
        if url == b"/v1/tokens" and server.tokens is not None and self.parser.get_method() == b"POST":
            # The hot path: no Request, routing or Response object for the usual answer.
            try:
                answer = server.tokens(caller, body, self._headers.get(b"content-type"))
            except Exception:
                log.exception("internal error while handling /v1/tokens")
                answer = Response(500, error_body("internal_error", "keyd hit an internal error"))
            if (
                answer.__class__ is bytes
                and self.held is None
                and not server.closing
                and self.parser.should_keep_alive()
            ):
                outbox = server.outbox
                outbox.append((self.transport, _OK_JSON % (len(answer), answer)))
                if len(outbox) == 1:
                    server.call_soon(server.flush)
                self.busy = False
                self.deadline = self.received + server.idle_timeout
                self._url = b""
                self._headers = {}
                self._header_bytes = 0
                self._body = b""
                return
            self._finish(answer if isinstance(answer, Response) else Response(200, answer))
            return
        query: dict[str, str] = {}
        path = url
        if b"?" in url:
            path, raw_query = url.split(b"?", 1)
            query = dict(parse_qsl(raw_query.decode("latin-1")))
        request = Request(
            method=self.parser.get_method(),
            path=path,
            query=query,
            headers=self._headers,
            body=body,
            caller=caller,
        )
        try:
            response = server.handler(request)
        except Exception:
            log.exception("internal error while handling %s", request.path_text)
            response = Response(500, error_body("internal_error", "keyd hit an internal error"))
        if isinstance(response, Deferred) and response.pending is not None:
            self._defer(response.pending)
            return
        self._finish(response)

    def _finish(self, response: Response) -> None:
        server = self.server
        keep_alive = self.parser.should_keep_alive() and not server.closing
        # An answer to HEAD has the headers GET would get and no body (RFC 9110 9.3.2).
        self._write(response, keep_alive, with_body=self.parser.get_method() != b"HEAD")
        self.busy = False
        if not keep_alive:
            if self.held is not None:  # close once the answers before this one are written
                self.held.append(None)
                self.parser = None
                raise _Abort
            server.flush()
            self.transport.close()
            raise _Abort
        self.deadline = self.received + server.idle_timeout
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = b""

    # -- deferred answers (the REST proxy) ---------------------------------------------------

    def _defer(self, pending: asyncio.Future[Response]) -> None:
        """An answer that comes later: hold every later answer on this connection behind it, so
        pipelined requests are still answered in order; the loop is never blocked waiting."""
        server = self.server
        keep_alive = self.parser.should_keep_alive() and not server.closing
        if self.held is None:
            self.held = deque()
        self.held.append((pending, keep_alive))
        pending.add_done_callback(self._release)
        self.busy = False
        self._url = b""  # the next pipelined request starts afresh (as _finish does)
        self._headers = {}
        self._header_bytes = 0
        self._body = b""
        if len(self.held) == MAX_HELD + 1:
            self.transport.pause_reading()  # a pipelining client waits for its answers
        if not keep_alive:
            self.parser = None
            raise _Abort

    def _release(self, _: object = None) -> None:
        """Write the held answers that are ready, in order, up to the first still pending."""
        held = self.held
        if held is None or self.transport is None:
            return
        server = self.server
        paused = len(held) > MAX_HELD  # _defer or _send stopped reading at that size
        while held:
            item = held[0]
            if item is None:  # a close that waited for the answers before it
                self.held = None
                server.flush()
                self.transport.close()
                return
            if isinstance(item, tuple):
                pending, keep_alive = item
                if not pending.done():
                    break
                held.popleft()
                if pending.cancelled() or pending.exception() is not None:
                    response = Response(500, error_body("internal_error", "keyd hit an internal error"))
                else:
                    response = pending.result()
                self.held = None
                self._write(response, keep_alive and not server.closing)
                self.held = held
                if not keep_alive or server.closing:
                    held.clear()
                    held.append(None)
                continue
            server.outbox.append((self.transport, held.popleft()))
        if not held:
            self.held = None
            if not self.busy:
                self.deadline = server.now() + server.idle_timeout
        if paused and len(held) <= MAX_HELD and not self.transport.is_closing():
            self.transport.resume_reading()
        server.flush()

    def _body_limit(self) -> int:
        """The body limit for this request: the REST proxy's for its paths, else server.max_body."""
        server = self.server
        if (
            server.rest_max_body
            and self._url.startswith(b"/v1/rest/")
            and self.caller is not None
            and server.rest_caller(self.caller)
        ):
            return server.rest_max_body
        return server.max_body

    # -- responses ---------------------------------------------------------------------------

    def _write(self, response: Response, keep_alive: bool, with_body: bool = True) -> None:
        body = response.body
        head = [
            _STATUS[response.status],
            b"Content-Type: ",
            response.content_type,
            b"\r\nContent-Length: %d\r\n" % len(body),
        ]
        for name, value in response.headers:
            head.append(name + b": " + value + b"\r\n")
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if with_body:
            head.append(body)
        self._send(b"".join(head))

    def _send(self, data: bytes) -> None:
        """Queue ``data`` for this connection; Server.flush writes it at the end of this loop pass.

        Answers to many connections go out back to back instead of one between every two parses:
        a client woken once per burst rather than once per answer costs both sides less (measured
        in docs/benchmarks.md). Anything that closes a connection flushes first, so order holds.
        """
        if self.held is not None:
            self.held.append(data)
            if len(self.held) == MAX_HELD + 1:
                self.transport.pause_reading()  # a pipelining client waits for its answers
            return
        server = self.server
        server.outbox.append((self.transport, data))
        if len(server.outbox) == 1:
            server.call_soon(server.flush)

    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer with an error and close the connection."""
        rejections = self.server.rejections
        rejections[code] = rejections.get(code, 0) + 1
        if self.held is not None and self.transport is not None:
            self.held.extend((_raw_response(status, code, message), None))
        elif self.transport is not None and not self.transport.is_closing():
            self._send(_raw_response(status, code, message))
            self.server.flush()
            self.transport.close()
        self.parser = None
        self.busy = False

    def _fail(self, status: int, code: str, message: str) -> None:
        """From inside a parser callback: reject, then stop the parser."""
        self._reject(status, code, message)
        raise _Abort

    def _too_large(self) -> None:
        limit = self._body_limit()
        if self.transport is None or self.transport.is_closing():
            raise _Abort
        if self.held is not None:  # answered, then closed, after the answers held before it
            self._reject(413, "body_too_large", f"the request body exceeds {limit} bytes")
            raise _Abort
        rejections = self.server.rejections
        rejections["body_too_large"] = rejections.get("body_too_large", 0) + 1
        self._send(_raw_response(413, "body_too_large", f"the request body exceeds {limit} bytes"))
        self.server.flush()
        # The client is most likely still sending its body. Closing now, with its bytes unread,
        # would reset the connection and it might never read this answer: stop writing, discard
        # whatever still arrives (parser is None), and let the sweeper close it shortly.
        self.transport.write_eof()
        self.parser = None
        self.busy = False
        self.deadline = self.server.now() + LINGER_SECONDS
        raise _Abort

    def half_close(self) -> None:
        """Shutdown, idle connection: an EOF tells the client no answer will come on it.

        Whatever the client still sends is read and dropped, so the final close finds nothing
        unread (closing with unread bytes would reset the connection under the client).
        """
        self.server.flush()
        self.parser = None
        if not self.transport.is_closing():
            self.transport.write_eof()

    def expire(self) -> None:
        """Called by the sweeper when the deadline passed: 408 mid-request, silent close when idle.

        close() waits for the write buffer to drain; a peer that never reads would keep its slot
        forever. So a connection still open one grace second after being closed is aborted.
        """
        self.server.flush()
        if self.held is not None and not self.busy and not self.transport.is_closing():
            # Idle only while a deferred answer is pending: that answer has its own timeout.
            self.deadline = self.server.now() + self.server.idle_timeout
            return
        if self.transport.is_closing():
            self.transport.abort()
        elif self.busy:
            self._reject(408, "request_timeout", "the request was not received in time")
        else:
            self.transport.close()
        self.deadline = self.server.now() + CLOSE_GRACE


class Server:
    """Accepts connections on one listening socket and hands parsed requests to ``handler``."""

    def __init__(
        self,
        config: ServerConfig,
        handler: Callable[[Request], Response],
        identities: Identities | None = None,
        tokens: Callable[[Caller, bytes, bytes | None], bytes | Response] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.handler = handler
        # POST /v1/tokens straight to the API (Api.issue), bypassing ``handler``'s generic objects.
        self.tokens = tokens
        self.identities = identities or Identities(config.identity_cache, clock=clock)
        self.connections: set[Connection] = set()
        # uid -> connections it holds now (server.max_connections_per_uid caps each)
        self.uid_connections: dict[int, int] = {}
        self.max_per_uid = config.max_connections_per_uid
        self.closing = False  # shutdown began: answers carry "Connection: close"
        self.stopped = False  # shutdown drained: no connection is accepted any more
        self.refused_connections = 0
        # error code -> requests rejected here, before the API (400, 408, 413, 414, 431, 500)
        self.rejections: dict[str, int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bound_path: str | None = None
        self._bound_inode: int | None = None
        # The clock for deadlines (monotonic, full resolution: uvloop's loop.time() counts
        # milliseconds). Deadlines are read from it when the bytes they concern arrive, and the
        # sweeper compares them with it every interval: never early, at most one interval late
        # (plus however long the event loop itself was stalled).
        self.now = clock
        self.request_timeout = config.request_timeout
        self.idle_timeout = config.idle_timeout
        self.first_byte_timeout = config.first_byte_timeout
        self.max_body = config.max_body
        self.max_body_digits = len(str(config.max_body))
        # The REST proxy's body limit for /v1/rest/ (0: no proxy, server.max_body everywhere), for
        # callers ``rest_caller`` accepts (a grant with the type rest): anyone else keeps max_body,
        # so a caller with no grant cannot make keyd hold a REST-sized body per connection.
        self.rest_max_body = 0
        self.rest_caller: Callable[[Caller], bool] = lambda caller: False
        self._interval = min(
            1.0, config.request_timeout / 4, config.idle_timeout / 4, config.first_byte_timeout / 4
        )
        # Answers queued by Connection._send, written by flush once per event-loop pass.
        self.outbox: list[tuple[Any, bytes]] = []
        self.call_soon: Callable[[Callable[[], None]], object] = _call_now

    def flush(self) -> None:
        """Write every queued answer, in the order queued."""
        outbox, self.outbox = self.outbox, []
        for transport, data in outbox:
            try:  # noqa: SIM105 - contextlib.suppress costs more, once per answer
                transport.write(data)
            except RuntimeError:  # uvloop: the connection was lost since; its answer has no reader
                pass

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush on ``loop``. start() does this; `keyd bench --inprocess` calls it alone, to feed
        connections without a socket."""
        self.call_soon = loop.call_soon

    def admit(self, conn: Connection, uid: int) -> bool:
        """Count a new connection against its uid's cap; False (not counted) when the cap is reached.

        Every uid counts, root and keyd's own included: a cap with an exception is a cap a
        compromised root-run client could exhaust for everyone else.
        """
        held = self.uid_connections.get(uid, 0)
        if held >= self.max_per_uid:
            self.refused_connections += 1
            return False
        self.uid_connections[uid] = held + 1
        conn.uid = uid
        self.connections.add(conn)
        return True

    def release(self, conn: Connection) -> None:
        """The connection is gone: it no longer counts against its uid."""
        uid = conn.uid
        conn.uid = None
        self.connections.discard(conn)
        if uid is not None:
            held = self.uid_connections.get(uid, 1) - 1
            if held > 0:
                self.uid_connections[uid] = held
            else:
                self.uid_connections.pop(uid, None)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on an inherited listening socket, or bind config.socket."""
        loop = asyncio.get_running_loop()
        self.attach(loop)
        if sock is None:
            sock, self._bound_inode = bind_socket(self.config)
            self._bound_path = self.config.socket
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock, backlog=4096)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        interval = self._interval
        while True:
            await asyncio.sleep(interval)
            self.expire_due()

    def expire_due(self) -> None:
        """One sweep: every connection whose deadline has passed on the clock now is expired."""
        now = self.now()
        for conn in [c for c in self.connections if c.deadline < now]:
            conn.expire()

    def stop_accepting(self) -> None:
        """Close the listener only. With socket activation systemd keeps the socket open, so new
        connections queue for the next keyd; the ones already accepted are served as usual."""
        if self._server is not None:
            self._server.close()

    async def shutdown(self) -> None:
        """Stop taking connections, answer what was already sent, close the rest without a reset.

        1. The socket file goes (no new client finds it), and every answer from now on carries
           "Connection: close".
        2. For DRAIN_SECONDS keyd keeps reading and answering: a request a client had sent before
           the stop began is in the kernel's buffer and gets its answer, with "Connection: close"
           (so do connections still waiting in the listen backlog).
        3. The listener closes; each idle connection gets an EOF (half-close) and what its client
           still sends is dropped: a client sees "closed", never a reset under a request it sent
           in time. Clients retry once on a fresh connection (README, docs/operations.md).
        4. Requests still being received may finish until server.shutdown_timeout; then every
           connection is closed.
        """
        self.closing = True
        self._remove_socket_file()
        self.flush()
        deadline = self.now() + self.config.shutdown_timeout
        await asyncio.sleep(min(DRAIN_SECONDS, self.config.shutdown_timeout / 2))
        for _ in range(3):  # after a stall the timer can fire before the I/O poll: poll too
            await asyncio.sleep(0)
        self.stopped = True
        if self._server is not None:
            self._server.close()
        self.flush()
        for conn in list(self.connections):
            if not conn.busy and conn.held is None:
                conn.half_close()
        linger = min(deadline, self.now() + CLOSE_GRACE)
        while self.connections and self.now() < deadline:
            if self.now() >= linger and not any(c.busy or c.held is not None for c in self.connections):
                break
            await asyncio.sleep(0.02)
        self.flush()
        for conn in list(self.connections):
            conn.transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def _remove_socket_file(self) -> None:
        if self._bound_path is None:
            return
        try:
            if os.lstat(self._bound_path).st_ino == self._bound_inode:
                os.unlink(self._bound_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove socket file %s: %s", self._bound_path, exc.strerror)
        self._bound_path = None
