"""``keyd bench --scale``: throughput against the number of grants, apps and open connections.

One OpenBao dev server; for each row a fresh keyd whose config has that many grants (the caller's
own grant last, behind all the others: the worst case for a scan), that many apps (the requests
use the first; every app's key is loaded and refreshed), or that many idle keep-alive connections
held open by the bench while the load runs. Each row reports tokens/s and p99 and its ratio to the
first row of its group (the issue-19 target: >= 0.9 with 10,000 grants).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from keyd.bench.load import Endpoint, loop_run, run_load
from keyd.bench.options import BenchError, Options
from keyd.bench.report import Result
from keyd.bench.stack import Stack, stack
from keyd.bench.workload import keyd_requests

GRANTS = (1, 100, 1_000, 10_000)
APPS = (1, 100, 500)
CONNECTIONS = (0, 1_000)
SECONDS = 10.0  # per row: 3 s rows moved by +-15 %, too much to judge a 0.9 target


def _config(s: Stack, grants: int, apps: int) -> str:
    base = open(s.config_path, encoding="utf-8").read()  # noqa: SIM115 - read once, small
    head, _, own = base.partition("[[grant]]")
    head = head.replace("[server]\n", "[server]\nmax_connections = 4096\nmax_connections_per_uid = 2048\n", 1)
    path = s.PATH
    extra_apps = "".join(f'\n[apps.app{i}]\napp_id = "tApp{i}"\npath = "{path}"\n' for i in range(1, apps))
    others = "".join(f'[[grant]]\nuid = {3_000_000 + i}\ntypes = ["user"]\n\n' for i in range(grants - 1))
    return head + extra_apps + "\n" + others + "[[grant]]" + own


@contextlib.contextmanager
def _idle(path: str, count: int) -> Iterator[None]:
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            held.append(sock)
        # Keep-alive but idle: a request each, so keyd's first-byte deadline does not close them.
        for sock in held:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: k\r\n\r\n")
        yield
    finally:
        for sock in held:
            sock.close()


def run(options: Options, out: TextIO) -> dict[str, Any]:
    seconds = options.duration or SECONDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    rows: list[dict[str, Any]] = []

    def say(text: str) -> None:
        if not options.json:
            print(text, file=out, flush=True)

    with stack() as s:
        say("starting an OpenBao dev server ...")
        s.start_vault()
        original = open(s.config_path, encoding="utf-8").read()  # noqa: SIM115

        def measure(group: str, value: int, grants: int, apps: int, idle: int) -> None:
            with open(s.config_path, "w", encoding="utf-8") as handle:
                handle.write(original)
            text = _config(s, grants, apps)
            with open(s.config_path, "w", encoding="utf-8") as handle:
                handle.write(text)
            began = time.perf_counter()
            s.start_keyd(timeout=60)
            ready = time.perf_counter() - began
            try:
                with _idle(s.keyd_socket, idle):
                    result: Result = loop_run(
                        run_load(
                            f"{group}={value}",
                            Endpoint(unix=s.keyd_socket),
                            keyd_requests(options.kind),
                            options.concurrency,
                            None,
                            seconds,
                            options.warmup,
                        )
                    )
            finally:
                s.stop_keyd()
                with open(s.config_path, "w", encoding="utf-8") as handle:
                    handle.write(original)
            if result.non_200:
                raise BenchError(f"{group}={value}: {result.non_200} requests were not answered 200")
            rows.append(
                {
                    "group": group,
                    "value": value,
                    "rps": round(result.throughput),
                    "p99_ms": round(result.p99_ms, 3),
                    "ready_s": round(ready, 2),
                }
            )
            base = next(r for r in rows if r["group"] == group)
            rows[-1]["ratio"] = round(result.throughput / base["rps"], 3) if base["rps"] else 0.0
            say(
                f"  {group:>11} {value:>6,}: {result.throughput:>9,.0f} tokens/s  p99 {result.p99_ms:6.2f} ms"
                f"  ready in {ready:4.1f}s  ratio {rows[-1]['ratio']:.2f}"
            )

        say(f"keyd bench --scale: {options.concurrency} connections, {seconds:g}s per row, {os.cpu_count()} CPUs")
        plan: list[tuple[str, tuple[int, ...], Callable[[int], tuple[int, int, int]]]] = [
            ("grants", GRANTS, lambda n: (n, 1, 0)),
            ("apps", APPS, lambda n: (1, n, 0)),
            ("connections", CONNECTIONS, lambda n: (1, 1, n)),
        ]
        for group, values, shape in plan:
            for value in values:
                measure(group, value, *shape(value))
    return {"scale": rows}
