"""How much a refusal flood adds to the audit log: ``python -m keyd.bench.audit_flood``.

A caller without a grant sends N token requests with 256-character user ids (non-ASCII, so each
escapes to six bytes a character in JSON), pipelined on one connection, to keyd's real wiring fed
in-process (as ``keyd bench --inprocess`` does: grants, API, audit to a file, no Vault). Prints the
audit file's growth, its lines by outcome and the folded count; exits 1 when the growth exceeds the
target (2 MiB for 20,000 refusals from one uid, docs/security.md) or the counts do not add up.
The integration test tests/adversarial/test_server_limits.py makes the same check against a real
keyd process and another uid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from keyd.bench.inprocess import StandInTransport, _keyd, warm_identity
from keyd.daemon.http.connection import Connection

TARGET_BYTES = 2 * 1024 * 1024
TARGET_REQUESTS = 20_000
BATCH = 100  # requests per data_received: pipelined, as a flooding client sends them


def _request(i: int) -> bytes:
    user_id = "\u00e9" * 200 + f"{i:08d}" + "x" * 48  # 256 characters
    body = json.dumps({"user_id": user_id}).encode()
    return (
        b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


async def _flood(workdir: str, count: int) -> dict[str, Any]:
    audit_path = os.path.join(workdir, "audit.log")
    # The only grant is for another uid: every request here is refused (403 forbidden).
    daemon = _keyd(workdir, grant={"uid": os.getuid() + 1, "types": ["user"]}, source="keyd.bench.audit_flood")
    loop = asyncio.get_running_loop()
    daemon.server.attach(loop)
    daemon.audit.attach(loop)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, peer:
        await warm_identity(daemon, ours)
        transport = StandInTransport(ours)
        connection = Connection(daemon.server)
        connection.connection_made(transport)
        started = time.perf_counter()
        for first in range(0, count, BATCH):
            connection.data_received(b"".join(_request(i) for i in range(first, min(count, first + BATCH))))
            while connection.waiting:  # parsed MAX_PER_TURN at a time, one turn after another
                await asyncio.sleep(0)
            await asyncio.sleep(0)  # the last turn's answers are written
        seconds = time.perf_counter() - started
        daemon.audit.close()  # writes the summary lines of what was folded
    with open(audit_path, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    outcomes = Counter(line["outcome"] for line in lines)
    folded = sum(line.get("folded", 0) for line in lines)
    growth = os.path.getsize(audit_path)
    return {
        "requests": count,
        "answers": transport.answers,
        "refused_answers": transport.non_200,
        "seconds": round(seconds, 3),
        "audit_bytes": growth,
        "audit_lines": dict(outcomes),
        "folded": folded,
        "accounted": outcomes["refused"] + folded,
        "target_bytes": TARGET_BYTES * count // TARGET_REQUESTS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyd.bench.audit_flood", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--requests", type=int, default=TARGET_REQUESTS, help="refused requests (default 20000)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kf-") as workdir:
        os.chmod(workdir, 0o700)
        result = asyncio.run(_flood(workdir, args.requests))
    ok = result["audit_bytes"] <= result["target_bytes"] and result["accounted"] == args.requests
    if args.json:
        print(json.dumps({**result, "ok": ok}, indent=2))
    else:
        print(
            f"{result['requests']:,} refused requests with 256-character user ids from one uid, pipelined, "
            f"in {result['seconds']} s:\n"
            f"  audit log grew {result['audit_bytes']:,} bytes (target <= {result['target_bytes']:,}); "
            f"lines {result['audit_lines']}; {result['folded']:,} refusals folded into summary lines\n"
            f"  every refusal accounted for: {result['accounted'] == args.requests}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
