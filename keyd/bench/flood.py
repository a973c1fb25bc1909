"""A grantless flood and a victim's fresh connections: how long another uid waits for its token.

The attack (adversarial round two): one process of a uid whose requests are all refused (no
grant, or one that refuses everything it asks) opens many connections to keyd's socket, each
pipelining refused ``POST /v1/tokens`` (64 per write), reading the answers as fast as they come
and opening a new connection whenever keyd closes one. Meanwhile another uid opens fresh connections, one at a
time, and times its first answer. Before keyd bounded each connection's share of an event-loop
turn and capped grantless uids' connections, that wait was 1.3 s with 30 flooding connections
and the whole flood with 200.

Stdlib only, so it runs as any user (``python3 -c "$(cat flood.py)" flood SOCKET ...``)::

    python -m keyd.bench.flood flood SOCKET --connections 200 --seconds 10   # as the attacker
    python -m keyd.bench.flood victim SOCKET --count 200                     # as a granted uid

``victim`` prints JSON: p50, p99 and max of the first-answer times in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time

REQUEST = b'POST /v1/tokens HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{"user_id":"bob"}'
PIPELINE = 64


def flood(path: str, connections: int, seconds: float, reconnect: bool = False) -> dict[str, int]:
    """``connections`` connections (with ``reconnect``, opened again whenever keyd closes one),
    each writing PIPELINE refused requests whenever it can and reading the answers."""
    selector = selectors.DefaultSelector()
    counts = {"opened": 0, "refused_connect": 0, "closed_by_keyd": 0, "bytes_received": 0}

    def open_one() -> None:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
        except OSError:
            counts["refused_connect"] += 1
            sock.close()
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        counts["opened"] += 1

    def close(sock: socket.socket) -> None:
        selector.unregister(sock)
        sock.close()
        counts["closed_by_keyd"] += 1

    for _ in range(connections):
        open_one()
    burst = REQUEST * PIPELINE
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(connections - len(selector.get_map()) if reconnect else 0):
            open_one()  # as many as keyd closed: again
        for key, events in selector.select(timeout=0.1):
            if not isinstance(key.fileobj, socket.socket):
                continue
            sock = key.fileobj
            try:
                if events & selectors.EVENT_READ:
                    data = sock.recv(1 << 20)
                    if not data:  # turned away (503) or closed
                        close(sock)
                        continue
                    counts["bytes_received"] += len(data)
                if events & selectors.EVENT_WRITE:
                    sock.send(burst)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                close(sock)
    for key in list(selector.get_map().values()):
        if isinstance(key.fileobj, socket.socket):
            key.fileobj.close()
    return counts


def _first_answer(path: str) -> float:
    began = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.sendall(REQUEST)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"the victim was not answered 200: {answer[:80]!r}")
    return time.perf_counter() - began


def victim(path: str, count: int, pause: float) -> dict[str, float]:
    times = []
    for _ in range(count):
        times.append(_first_answer(path))
        time.sleep(pause)
    times.sort()
    return {
        "count": count,
        "p50_ms": round(1000 * times[len(times) // 2], 2),
        "p99_ms": round(1000 * times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "max_ms": round(1000 * times[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyd.bench.flood", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    attacker = sub.add_parser("flood", help="the grantless flood (run as a uid no grant matches)")
    attacker.add_argument("socket")
    attacker.add_argument("--connections", type=int, default=200)
    attacker.add_argument("--seconds", type=float, default=10.0)
    attacker.add_argument("--reconnect", action="store_true", help="open a new connection whenever keyd closes one")
    target = sub.add_parser("victim", help="fresh connections of a granted uid, timed")
    target.add_argument("socket")
    target.add_argument("--count", type=int, default=200)
    target.add_argument("--pause", type=float, default=0.01)
    args = parser.parse_args(argv)
    if args.role == "flood":
        result: dict[str, float] = dict(flood(args.socket, args.connections, args.seconds, args.reconnect))
    else:
        result = victim(args.socket, args.count, args.pause)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
