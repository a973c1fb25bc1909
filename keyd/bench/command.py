"""``keyd bench``: a load generator for keyd, and the comparisons that give its numbers a meaning.

The client is a lean asyncio (uvloop) program in its own process (keyd.bench.load). ``--compare``
measures, in the same run and with the same load shape:

- ``keyd``: ``POST /v1/tokens`` on keyd's Unix socket;
- ``reference``: the bare reference server (keyd.bench.reference, run as its own process);
- ``transit`` and ``pyjwt`` (keyd.bench.compare).

Without ``--socket`` the bench starts its own stack (keyd.bench.stack), as ``keyd dev`` does, and
stops it at the end. ``--inprocess``, ``--memory`` and ``--startup`` are measurements of their own
(keyd.bench.inprocess, keyd.bench.footprint); this module picks the one the options ask for.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from typing import Any, TextIO

from keyd.bench import compare, footprint, inprocess, report
from keyd.bench.load import Endpoint, loop_run, run_load
from keyd.bench.options import DEFAULT_DURATION, BenchError, Options
from keyd.bench.report import Result
from keyd.bench.stack import health_status, stack
from keyd.bench.workload import keyd_requests


def run(options: Options, out: TextIO = sys.stdout) -> tuple[dict[str, Any], bool]:
    """Run the benchmark the options describe; (report document, whether every answer was a 200).

    With ``options.plot`` the run's throughput and p99 per target are also drawn to that PNG.
    """
    if not options.plot:
        return measure(options, out)
    if options.inprocess or options.memory or options.startup or options.scale:
        raise BenchError("--plot draws runs under load (the default, --compare, --rest), not this measurement")
    from keyd.bench import plot  # noqa: PLC0415 - matplotlib only when a plot is asked for

    plot.require_matplotlib()  # before the run, not after it
    doc, clean = measure(options, out)
    written = plot.draw(doc, options.plot)
    if not options.json:
        print(f"plot:      {written}", file=out)
    return doc, clean


def measure(options: Options, out: TextIO) -> tuple[dict[str, Any], bool]:
    """The measurement the options pick (see the module doc)."""
    if options.rest:
        from keyd.bench import rest  # noqa: PLC0415 - only this mode needs the TalkJS stand-in

        return rest.run_rest(options, out)
    if options.scale:
        from keyd.bench import scale  # noqa: PLC0415

        doc = scale.run(options, out)
        if options.json:
            print(json.dumps(doc, indent=2), file=out)
        return doc, True
    if options.inprocess:
        doc = inprocess.run_inprocess(options, out)
        return doc, doc["inprocess"]["non_200"] == 0
    if options.memory:
        doc = footprint.memory(options, out)
        return doc, doc["non_200"] == 0
    if options.startup:
        return footprint.startup(options, out), True
    return load_run(options, out)


def load_run(options: Options, out: TextIO) -> tuple[dict[str, Any], bool]:
    """keyd (and with ``--compare`` the other targets) under load over sockets; see the module doc."""
    progress = out if (out.isatty() and not options.json) else None
    total = options.requests
    seconds = None if total is not None else (options.duration or DEFAULT_DURATION)
    doc: dict[str, Any] = {
        "machine": report.machine(),
        "load": {
            "concurrency": options.concurrency,
            "requests": total,
            "duration": seconds,
            "type": options.kind,
            "client": "asyncio+uvloop, keep-alive, one request in flight per connection",
        },
    }
    results: dict[str, Result] = {}

    def say(text: str) -> None:
        if not options.json:
            print(text, file=out, flush=True)

    def measure(name: str, endpoint: Endpoint, requests: list[bytes]) -> Result:
        meter = s.meter(name) if options.socket is None else None
        result = loop_run(
            run_load(name, endpoint, requests, options.concurrency, total, seconds, options.warmup, progress, meter)
        )
        results[name] = result
        say(result.line())
        return result

    with stack() as s:
        if options.socket is None:
            say("starting an OpenBao dev server and keyd (no --socket given) ...")
            s.start_vault()
            s.start_keyd()
            socket_path = s.keyd_socket
        else:
            socket_path = options.socket
            if health_status(socket_path) == 0:
                raise BenchError(f"no keyd answers on {socket_path} (start one, or omit --socket)")
        shape = f"{options.concurrency} connections, " + (
            f"{total:,} requests" if total is not None else f"{seconds:g}s"
        )
        say(f"keyd bench: {options.kind} tokens, {shape} per target, {os.cpu_count()} CPUs")
        measure("keyd", Endpoint(unix=socket_path), keyd_requests(options.kind))
        if options.compare:
            s.start_reference()
            measure("reference", Endpoint(unix=s.reference_socket), keyd_requests(options.kind))
            transit_doc = compare.transit_run(options, s, measure, say)
            doc["transit"] = transit_doc
            pyjwt = compare.pyjwt_run(s.key or secrets.token_bytes(32), options.kind, seconds or 5.0)
            results["pyjwt"] = pyjwt
            say(pyjwt.line())
    doc["results"] = {name: r.to_json() for name, r in results.items()}
    if options.compare:
        doc["ratios"], doc["targets"] = report.ratios(results)
        for line in report.ratio_lines(doc["ratios"], doc["targets"]):
            say(line)
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    return doc, results["keyd"].non_200 == 0
