"""``keyd bench --inprocess``: the CPU cost of the request path without sockets, keyd against the
bare reference server.

Each server's connection object is fed whole requests in a loop, through a stand-in transport that
only looks at the answers, on a uvloop loop: one connection, the same requests ``keyd bench`` sends.
keyd is the daemon's real wiring (grants, key store, audit to a file, metrics) with a random key put
in its store and no Vault. What this leaves out (system calls, the event loop's polling, waking the
client) costs both servers about the same; what remains is the Python work per request, the part
code changes move. Figures are the best of several rounds (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TextIO

from keyd import config as configuration
from keyd.bench.load import loop_run
from keyd.bench.options import Options
from keyd.bench.reference import ReferenceConnection
from keyd.bench.report import machine
from keyd.bench.workload import APP_ID, keyd_requests
from keyd.daemon.http.connection import Connection
from keyd.daemon.keys.keystore import KeySnapshot, SecretKey
from keyd.daemon.wiring import Daemon

DEFAULT_REQUESTS = 100_000
ROUNDS = 5
YIELD_EVERY = 256  # let the loop run queued writes and the audit flush, as it would between reads


class StandInTransport:
    """What keyd's Connection and the reference use of an asyncio transport; counts the answers."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.answers = 0
        self.non_200 = 0

    def write(self, data: bytes) -> None:
        self.answers += 1
        if not data.startswith(b"HTTP/1.1 200 "):
            self.non_200 += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock if name == "socket" else default  # peer credentials: this process

    def is_closing(self) -> bool:
        return False

    def _nothing(self) -> None:
        return None

    # Nothing to close, pause or half-close: no socket carries the requests.
    close = abort = write_eof = pause_reading = resume_reading = _nothing


def _keyd(workdir: str, grant: dict[str, Any] | None = None, source: str = "keyd bench --inprocess") -> Daemon:
    """keyd as `keyd run` wires it, minus Vault: one app whose key is put in the store directly, the
    audit log in ``workdir``/audit.log and one grant (by default: this uid, user and app tokens)."""
    token_file = os.path.join(workdir, "unused-token")
    with open(token_file, "w", encoding="utf-8") as handle:
        handle.write("never-sent\n")  # keyd never logs in here; the file only satisfies the config
    config = configuration.parse(
        {
            "server": {"socket": os.path.join(workdir, "unused.sock")},
            "vault": {"address": "http://127.0.0.1:1", "auth": {"method": "token", "token_file": token_file}},
            "apps": {"default": {"app_id": APP_ID, "path": "talkjs/bench"}},
            "grant": [grant or {"uid": os.getuid(), "types": ["user", "app"]}],
            "audit": {"file": os.path.join(workdir, "audit.log")},
        },
        source,
    )
    daemon = Daemon(config)
    key = SecretKey.from_str("sk_test_" + secrets.token_hex(16))
    daemon.store.record_success(KeySnapshot("default", key, key, version=1, kv_version=2, loaded_at=time.time()))
    return daemon


async def _best(feed: Callable[[bytes], None], requests: Sequence[bytes], total: int, rounds: int) -> float:
    """Seconds per request: the fastest of ``rounds`` rounds of ``total`` requests."""
    count = len(requests)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(total):
            feed(requests[i % count])
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        best = min(best, time.perf_counter() - started)
        await asyncio.sleep(0)
    return best / total


async def warm_identity(daemon: Daemon, sock: socket.socket) -> None:
    """Have keyd know this process's uid before the feed: a new uid's first bytes are held until its
    names are looked up (in a worker thread), and the feed does not wait for that."""
    _, naming = daemon.server.identities.identify(sock)
    if naming is not None:
        named: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        naming(named.set_result)
        await named


@contextlib.asynccontextmanager
async def keyd_connection(sock: socket.socket) -> AsyncIterator[tuple[Connection, StandInTransport]]:
    """An in-process keyd (``_keyd``) and one Connection to it whose caller is ``sock``'s process;
    the audit log is closed on the way out."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="kb-") as workdir:
        daemon = _keyd(workdir)
        daemon.server.attach(loop)
        daemon.audit.attach(loop)
        await warm_identity(daemon, sock)
        transport = StandInTransport(sock)
        connection = Connection(daemon.server)
        connection.connection_made(transport)
        try:
            yield connection, transport
        finally:
            daemon.audit.close()


async def _measure(kind: str, total: int, rounds: int) -> dict[str, Any]:
    requests = keyd_requests(kind)
    ours, _peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, _peer:
        async with keyd_connection(ours) as (connection, keyd_transport):
            keyd_seconds = await _best(connection.data_received, requests, total, rounds)
        reference_transport = StandInTransport(ours)
        reference = ReferenceConnection(hmac.new(secrets.token_bytes(32), digestmod="sha256"))
        reference.connection_made(reference_transport)
        reference_seconds = await _best(reference.data_received, requests, total, rounds)
    return {
        "requests": total,
        "rounds": rounds,
        "type": kind,
        "keyd_us": round(keyd_seconds * 1e6, 2),
        "reference_us": round(reference_seconds * 1e6, 2),
        "ratio": round(reference_seconds / keyd_seconds, 3),
        "answers": {"keyd": keyd_transport.answers, "reference": reference_transport.answers},
        "non_200": keyd_transport.non_200 + reference_transport.non_200,
    }


def run_inprocess(options: Options, out: TextIO = sys.stdout, rounds: int = ROUNDS) -> dict[str, Any]:
    """Measure, print (text or JSON) and return the report."""
    total = options.requests or DEFAULT_REQUESTS
    result = loop_run(_measure(options.kind, total, rounds))
    doc = {"machine": machine(), "inprocess": result}
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
        return doc
    print(
        f"in-process, no sockets: one connection, best of {rounds} rounds of {total:,} {options.kind}-token requests",
        file=out,
    )
    for name in ("keyd", "reference"):
        us = result[f"{name}_us"]
        print(f"{name:<10} {us:6.2f} us/request  ({1e6 / us:,.0f}/s on one core)", file=out)
    print(f"keyd/reference {result['ratio']:.2f}; non-200 answers: {result['non_200']}", file=out)
    return doc
