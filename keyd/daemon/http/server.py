"""Accept connections on one listening socket: limits, deadlines, the outbox, graceful shutdown.

The parts, each in its own module: ``socketfile`` creates the listening socket file, ``connection``
parses and answers one connection, and this module owns what connections share: the connection
caps, the sweeper that enforces every deadline (one task rather than a timer per request), the
outbox that writes answers once per event-loop pass, and the order of shutdown. It knows no routes:
every request goes to one ``dispatch`` (``Api.dispatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from keyd.config import ServerConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.callers.names import Identities
from keyd.daemon.http.connection import CLOSE_GRACE, SHUTTING_DOWN, TOO_MANY, Connection
from keyd.daemon.http.limits import Limits
from keyd.daemon.http.outbox import Outbox
from keyd.daemon.http.socketfile import bind_socket, remove_socket_file
from keyd.daemon.http.types import Dispatch, Identify

log = logging.getLogger("keyd.server")

# On shutdown: how long requests already sent (or arriving) are still read and answered with
# "Connection: close" before idle connections get an EOF (Server.shutdown).
DRAIN_SECONDS = 0.1
# Refused answers a uid gets before its connections close after each answer (and it meets
# max_connections_without_grant): a burst, then a rate. Honest clients are refused rarely.
REFUSAL_BURST = 200
REFUSAL_RATE = 100.0
MAX_REFUSAL_BUCKETS = 65536


class Server:
    """Accepts connections on one listening socket and hands each parsed request to ``dispatch``."""

    def __init__(
        self,
        config: ServerConfig,
        dispatch: Dispatch,
        identities: Identify | None = None,
        clock: Callable[[], float] = time.monotonic,
        body_limit: Callable[[bytes, Caller | None], int] | None = None,
        has_grant: Callable[[Caller], bool] | None = None,
        section: str = "server",
    ) -> None:
        self.config = config
        self.section = section  # the config section errors about config.socket name
        self.dispatch = dispatch
        self.identities: Identify = identities or Identities(config.identity_cache, clock=clock)
        # Every limit, read from the config once; each connection reads this same value.
        self.limits = Limits.of(config)
        self.connections: set[Connection] = set()
        # uid -> connections it holds now (limits.max_connections_per_uid caps each)
        self.uid_connections: dict[int, int] = {}
        # A caller no grant matches may only be refused: its uid's cap is the low
        # limits.max_connections_without_grant (Api.has_grant tells; everyone has one without it).
        self.has_grant: Callable[[Caller], bool] = has_grant or (lambda caller: True)
        self._refusals: dict[int, list[float]] = {}  # uid -> [tokens left, when last refused]
        self.closing = False  # shutdown began: answers carry "Connection: close"
        self.stopped = False  # shutdown drained: no connection is accepted any more
        self.refused_connections = 0
        # error code -> requests rejected here, before the API (400, 408, 413, 414, 431, 500)
        self.rejections: dict[str, int] = {}
        self.outbox = Outbox()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bound: tuple[str, int] | None = None  # (path, inode) of the socket file keyd made
        self._unserved: socket.socket | None = None  # bound by ``bind``, until ``start`` serves it
        # The clock for deadlines (monotonic, full resolution: uvloop's loop.time() counts
        # milliseconds). Deadlines are read from it when the bytes they concern arrive, and the
        # sweeper compares them with it every interval: never early, at most one interval late
        # (plus however long the event loop itself was stalled).
        self.now = clock
        # A larger body limit for some targets (Api.body_limit: the REST proxy), 0 for none; asked
        # only about a body over limits.max_body.
        self.body_limit: Callable[[bytes, Caller | None], int] = body_limit or (lambda target, caller: 0)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush the outbox on ``loop``. start() does this; `keyd bench --inprocess` calls it alone,
        to feed connections without a socket."""
        self.outbox.call_soon = loop.call_soon

    def count_rejection(self, code: str) -> None:
        """A request refused by the connection, before the API (for the metrics)."""
        self.rejections[code] = self.rejections.get(code, 0) + 1

    def turn_away(self) -> bytes | None:
        """The answer that turns a new connection away before it is read from (shutdown drained,
        or max_connections reached), None to go on: to identify its caller, then ``admit``."""
        if self.stopped:
            return SHUTTING_DOWN
        if len(self.connections) >= self.limits.max_connections:
            self.refused_connections += 1
            return TOO_MANY
        return None

    def admit(self, conn: Connection, caller: Caller) -> bool:
        """Count a new connection against its uid's cap; False (not counted) when the cap is reached.

        Every uid counts, root and keyd's own included: a cap with an exception is a cap a
        compromised root-run client could exhaust for everyone else. A caller that no grant
        matches (it can only be refused) meets the lower ``max_connections_without_grant``, its
        uid's connections counted as a whole.
        """
        uid = caller.uid
        held = self.uid_connections.get(uid, 0)
        limits = self.limits
        if held >= limits.max_connections_per_uid or (
            held >= limits.max_connections_without_grant and (self.refusing(uid) or not self.has_grant(caller))
        ):
            self.refused_connections += 1
            return False
        self.uid_connections[uid] = held + 1
        conn.uid = uid
        self.connections.add(conn)
        return True

    def refused(self, caller: Caller) -> bool:
        """A refusal (a 4xx/5xx answer) for a caller that has a grant: True once its uid is over
        its refusal budget (REFUSAL_RATE a second, bursts of REFUSAL_BURST), so the connection
        closes after this answer and the uid meets max_connections_without_grant, as if it had no
        grant, until its budget refills. A grant that refuses everything asked (a user_id_pattern
        nobody matches) must not buy the flood that no grant no longer can. (A caller without a
        grant is held to that cap anyway.)"""
        if not self.has_grant(caller):
            return False
        uid = caller.uid
        now = self.now()
        bucket = self._refusals.get(uid)
        if bucket is None:
            if len(self._refusals) >= MAX_REFUSAL_BUCKETS:
                self._refusals.clear()  # forgetting a bucket only gives a uid a fresh budget
            bucket = self._refusals[uid] = [float(REFUSAL_BURST), now]
        tokens = min(float(REFUSAL_BURST), bucket[0] + (now - bucket[1]) * REFUSAL_RATE)
        bucket[1] = now
        bucket[0] = max(tokens - 1.0, -1.0)
        return tokens < 1.0

    def refusing(self, uid: int) -> bool:
        """Whether ``uid`` is over its refusal budget now (see ``refused``)."""
        bucket = self._refusals.get(uid)
        if bucket is None:
            return False
        return bucket[0] + (self.now() - bucket[1]) * REFUSAL_RATE < 1.0

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

    def bind(self) -> socket.socket:
        """Bind config.socket, listening: the kernel queues connections until ``start`` accepts
        them. ``shutdown`` removes the file (if it is still keyd's)."""
        sock, inode = bind_socket(self.config, self.section)
        self._bound = (self.config.socket, inode)
        self._unserved = sock
        return sock

    def unbind(self) -> None:
        """After a start that failed between ``bind`` and ``start``: the socket file goes and the
        listening socket closes. Nothing once ``shutdown`` has run (it removed the file)."""
        if self._bound is not None:
            remove_socket_file(*self._bound)
            self._bound = None
        if self._unserved is not None and self._server is None:
            self._unserved.close()
        self._unserved = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on a listening socket: inherited (Unix or, for the metrics listener, TCP), from
        ``bind``, or (None) config.socket bound now."""
        loop = asyncio.get_running_loop()
        self.attach(loop)
        if sock is None:
            sock = self.bind()
        if sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock, backlog=4096)
        else:
            self._server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=4096)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        interval = self.limits.sweep_interval
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
        if self._bound is not None:
            remove_socket_file(*self._bound)
            self._bound = None
        self.outbox.flush()
        deadline = self.now() + self.limits.shutdown_timeout
        await asyncio.sleep(min(DRAIN_SECONDS, self.limits.shutdown_timeout / 2))
        for _ in range(3):  # after a stall the timer can fire before the I/O poll: poll too
            await asyncio.sleep(0)
        self.stopped = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.half_close()
        linger = min(deadline, self.now() + CLOSE_GRACE)
        while self.connections and self.now() < deadline:
            if self.now() >= linger and all(c.idle for c in self.connections):
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
