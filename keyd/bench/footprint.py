"""``keyd bench --memory`` and ``--startup``: keyd's resident memory under a million tokens, and the
seconds from ``keyd run`` to listening and to ready."""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from keyd.bench.load import Endpoint, loop_run, run_load
from keyd.bench.options import Options
from keyd.bench.report import TARGET_GROWTH_MB, TARGET_IDLE_RSS_MB, TARGET_READY_S, machine
from keyd.bench.stack import rss_bytes, stack
from keyd.bench.workload import keyd_requests


def memory(options: Options, out: TextIO) -> dict[str, Any]:
    """keyd's RSS idle with one app, after a warm-up, and after ``requests`` tokens (default 1M)."""
    total = options.requests or 1_000_000
    mb = 1e6
    progress = out if (out.isatty() and not options.json) else None
    with stack() as s:
        s.start_vault()
        s.start_keyd()
        assert s.keyd is not None  # noqa: S101 - started just above
        pid = s.keyd.pid
        time.sleep(1.0)
        idle = rss_bytes(pid)
        endpoint = Endpoint(unix=s.keyd_socket)
        requests = keyd_requests(options.kind)
        loop_run(run_load("warm-up", endpoint, requests, options.concurrency, total=20_000, warmup=0))
        warm = rss_bytes(pid)
        result = loop_run(
            run_load(
                "keyd", endpoint, requests, options.concurrency, total=total, warmup=0, progress=progress
            )
        )
        time.sleep(0.5)
        after = rss_bytes(pid)
    doc: dict[str, Any] = {
        "machine": machine(),
        "tokens": result.requests,
        "non_200": result.non_200,
        "rss_mb": {
            "idle": round(idle / mb, 1),
            "after_warmup": round(warm / mb, 1),
            "after": round(after / mb, 1),
        },
        "growth_mb": round((after - warm) / mb, 2),
        "growth_from_idle_mb": round((after - idle) / mb, 2),
        "targets": {
            "idle_rss_mb": {"target": TARGET_IDLE_RSS_MB, "met": idle / mb <= TARGET_IDLE_RSS_MB},
            "growth_mb": {"target": TARGET_GROWTH_MB, "met": (after - warm) / mb <= TARGET_GROWTH_MB},
        },
    }
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        r = doc["rss_mb"]
        print(
            f"keyd RSS: idle {r['idle']} MB (one app loaded), after 20k warm-up {r['after_warmup']} MB, "
            f"after {result.requests:,} more tokens {r['after']} MB: growth {doc['growth_mb']} MB "
            f"({doc['growth_from_idle_mb']} MB from idle); non-200 {result.non_200}",
            file=out,
        )
        print(
            f"targets:   idle <= {TARGET_IDLE_RSS_MB:g} MB "
            f"{'met' if doc['targets']['idle_rss_mb']['met'] else 'MISSED'}; growth <= {TARGET_GROWTH_MB:g} MB "
            f"{'met' if doc['targets']['growth_mb']['met'] else 'MISSED'}",
            file=out,
        )
    return doc


def startup(options: Options, out: TextIO, runs: int = 5) -> dict[str, Any]:
    """Seconds from starting ``keyd run`` (Vault already answering) to listening and to ready."""
    listening: list[float] = []
    ready: list[float] = []
    with stack() as s:
        s.start_vault()
        for _ in range(runs):
            first, whole = s.start_keyd()
            listening.append(first)
            ready.append(whole)
            s.stop_keyd()
    doc: dict[str, Any] = {
        "machine": machine(),
        "runs": runs,
        "listening_s": [round(x, 3) for x in listening],
        "ready_s": [round(x, 3) for x in ready],
        "ready_median_s": round(sorted(ready)[runs // 2], 3),
        "targets": {"ready_s": {"target": TARGET_READY_S, "met": max(ready) <= TARGET_READY_S}},
    }
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        print(
            f"keyd start-up ({runs} runs, Vault already up): listening after "
            f"{', '.join(f'{x:.3f}' for x in listening)} s; ready (health 200) after "
            f"{', '.join(f'{x:.3f}' for x in ready)} s",
            file=out,
        )
        met = doc["targets"]["ready_s"]["met"]
        print(f"targets:   ready <= {TARGET_READY_S:g} s {'met' if met else 'MISSED'}", file=out)
    return doc
