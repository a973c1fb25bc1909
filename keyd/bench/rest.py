"""``keyd bench --rest``: what the REST proxy costs, measured against calling TalkJS directly.

One run starts an OpenBao dev server, the HTTPS stand-in for TalkJS (keyd/bench/standin.py, its own
process, certificate from a CA made for the run) and keyd with a ``rest`` grant pointing at it. The
same load generator (keyd.bench.load.run_load) then measures, in this order:

1. latency, one request at a time: ``direct`` (TLS to the stand-in, with tokens minted here) and
   ``proxied`` (``GET /v1/rest/default/users/ID`` on keyd's socket); the difference of the medians
   is the latency keyd adds (target: under 0.5 ms);
2. throughput, ``concurrency`` connections: the same two;
3. token signing (``POST /v1/tokens``) alone, then while another process keeps ``concurrency``
   proxied calls in flight against a slow TalkJS (each answered after ``SLOW_MS``), in ``ROUNDS``
   alternating rounds: the signing throughput under proxy load must stay within 10 % of the
   throughput without it.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from keyd.bench import report, stack, workload
from keyd.bench.load import Endpoint, loop_run, run_load
from keyd.bench.options import DEFAULT_DURATION, Options
from keyd.bench.report import Result
from keyd.bench.standin import StandinProcess
from keyd.daemon.signing import tokens

TARGET_ADDED_P50_MS = 0.5
TARGET_SIGNING_UNDER_LOAD = 0.9
SLOW_MS = 50
LATENCY_SECONDS = 3.0
ROUNDS = 2

_REST_CONFIG = """
[apps.default.rest]
base_url = "https://127.0.0.1:{port}"
ca_file = {ca}
token_ttl = 10
max_connections = {connections}
max_concurrent = {connections}

[[grant]]
uid = {uid}
types = ["user", "app", "rest"]
rest = ["GET /users/*"]
"""


class _Key:
    """The demo key as tokens.Keyed, for minting the direct calls' tokens here."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def hmac(self) -> Any:
        import hmac  # noqa: PLC0415

        return hmac.new(self.key, digestmod="sha256")


def _requests(prefix: str, host: str, tokens_for: list[bytes] | None = None, query: str = "") -> list[bytes]:
    out = []
    for i, user in enumerate(workload.user_ids()):
        head = f"GET {prefix}/users/{user}{query} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
        if tokens_for is not None:
            head += f"Authorization: Bearer {tokens_for[i].decode()}\r\n"
        out.append((head + "\r\n").encode())
    return out


def proxy_load(socket_path: str, seconds: float, concurrency: int) -> None:
    """Run in a child process: keep ``concurrency`` slow proxied calls in flight; print the result."""
    requests = _requests("/v1/rest/default", "keyd", query=f"?delay_ms={SLOW_MS}")
    result = loop_run(
        run_load("proxy-load", Endpoint(unix=socket_path), requests, concurrency, seconds=seconds, warmup=0)
    )
    print(json.dumps(result.to_json()))


def run_rest(options: Options, out: TextIO = sys.stdout) -> tuple[dict[str, Any], bool]:
    """The measurements described in the module docstring; (report, whether every answer was 200)."""
    seconds = options.duration or DEFAULT_DURATION
    concurrency = options.concurrency
    results: dict[str, Result] = {}
    loads: list[dict[str, Any]] = []

    def say(text: str) -> None:
        if not options.json:
            print(text, file=out, flush=True)

    def measure(name: str, endpoint: Endpoint, requests: list[bytes], conns: int, duration: float) -> Result:
        result = loop_run(run_load(name, endpoint, requests, conns, seconds=duration, warmup=options.warmup))
        results[name] = result
        say(result.line())
        return result

    with stack.stack() as s:
        say("starting an OpenBao dev server, the TalkJS stand-in and keyd ...")
        s.start_vault()
        workdir = Path(s.workdir)
        with StandinProcess(workdir, s.key, workload.APP_ID, 3600) as standin:
            port, ca = standin.port, standin.ca
            # The bench's own grant (user and app tokens) becomes one that also allows the proxy.
            config = Path(s.config_path).read_text()
            Path(s.config_path).write_text(
                config[: config.index("[[grant]]")]
                + _REST_CONFIG.format(
                    port=port, ca=json.dumps(str(ca)), connections=max(64, concurrency * 2), uid=os.getuid()
                )
            )
            s.start_keyd()
            tls = ssl.create_default_context(cafile=str(ca))
            direct = Endpoint(host="127.0.0.1", port=port, tls=tls)
            proxied = Endpoint(unix=s.keyd_socket)
            now = int(time.time())
            minted = [tokens.app_token(_Key(s.key), workload.APP_ID, now, 3000) for _ in workload.user_ids()]
            direct_requests = _requests(f"/v1/{workload.APP_ID}", f"127.0.0.1:{port}", minted)
            proxied_requests = _requests("/v1/rest/default", "keyd")
            say(
                f"keyd bench --rest: latency with 1 connection ({LATENCY_SECONDS:g}s each), then {concurrency} connections ({seconds:g}s each)"
            )
            measure("direct-1", direct, direct_requests, 1, LATENCY_SECONDS)
            measure("proxied-1", proxied, proxied_requests, 1, LATENCY_SECONDS)
            measure("direct", direct, direct_requests, concurrency, seconds)
            measure("proxied", proxied, proxied_requests, concurrency, seconds)
            say(
                f"token signing alone, then with {concurrency} proxied calls in flight to a TalkJS answering in {SLOW_MS} ms"
            )
            token_requests = workload.keyd_requests("user")
            # Alternating rounds, so a change in the machine's other load hits both sides alike.
            for round_ in range(1, ROUNDS + 1):
                measure(f"tokens-{round_}", proxied, token_requests, concurrency, seconds)
                loader = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "from keyd.bench.rest import proxy_load; "
                        f"proxy_load({s.keyd_socket!r}, {seconds + 2.0 + options.warmup!r}, {concurrency})",
                    ],
                    stdout=subprocess.PIPE,
                )
                time.sleep(1.0)  # the proxy load is in full swing before signing is measured
                measure(f"tokens+proxy-{round_}", proxied, token_requests, concurrency, seconds)
                background, _ = loader.communicate(timeout=seconds + 60)
                loads.append(json.loads(background) if background.strip() else {})
    added = results["proxied-1"].p50_ms - results["direct-1"].p50_ms
    alone = sum(r.throughput for name, r in results.items() if name.startswith("tokens-"))
    loaded = sum(r.throughput for name, r in results.items() if name.startswith("tokens+proxy-"))
    under_load = loaded / alone if alone else 0.0
    load = {
        "throughput": round(sum(x.get("throughput", 0) for x in loads) / max(1, len(loads)), 1),
        "non_200": sum(x.get("non_200", 1) for x in loads) if loads else 1,
    }
    doc: dict[str, Any] = {
        "machine": report.machine(),
        "results": {name: r.to_json() for name, r in results.items()},
        "proxy_load": load,
        "added_p50_ms": round(added, 3),
        "signing_under_proxy_load": round(under_load, 3),
        "targets": {
            "added_p50_ms": {
                "target": TARGET_ADDED_P50_MS,
                "got": round(added, 3),
                "met": added < TARGET_ADDED_P50_MS,
            },
            "signing_under_proxy_load": {
                "target": TARGET_SIGNING_UNDER_LOAD,
                "got": round(under_load, 3),
                "met": under_load >= TARGET_SIGNING_UNDER_LOAD,
            },
        },
    }
    say(
        f"proxy load: {load.get('throughput', 0):,.0f} proxied calls/s in the background, "
        f"non-200 {load.get('non_200', '?')}"
    )
    say(
        f"added p50 {added:.3f} ms ({'met' if added < TARGET_ADDED_P50_MS else 'MISSED'} < {TARGET_ADDED_P50_MS} ms); "
        f"signing under proxy load {under_load:.2%} of alone "
        f"({'met' if under_load >= TARGET_SIGNING_UNDER_LOAD else 'MISSED'} >= {TARGET_SIGNING_UNDER_LOAD:.0%})"
    )
    if options.json:
        print(json.dumps(doc, indent=2), file=out)
    clean = all(r.non_200 == 0 for r in results.values()) and load.get("non_200", 1) == 0
    return doc, clean
