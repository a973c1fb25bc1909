"""Instructions per token on keyd's request path: ``python -m keyd.bench.instructions``.

On a shared machine a timed run moves by more than the tens of nanoseconds one Python call costs;
the number of instructions a request executes barely moves. This feeds keyd's in-process path (the
wiring, stand-in transport and requests of ``keyd bench --inprocess``, keyd alone) under
``valgrind --tool=callgrind`` twice, a short and a long run, and divides the difference by the extra
requests, so start-up and imports cancel out. Needs valgrind (Debian: ``apt install valgrind``);
about a minute. The instruction counts in docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys

from keyd.bench.inprocess import _best, keyd_connection
from keyd.bench.load import loop_run
from keyd.bench.options import BenchError
from keyd.bench.workload import keyd_requests

SHORT = 3_000
LONG = 23_000
_COLLECTED = re.compile(rb"Collected : (\d+)")


async def _feed(total: int, kind: str) -> None:
    """One round of ``total`` requests through keyd's Connection, as ``keyd bench --inprocess``."""
    ours, _peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, _peer:
        async with keyd_connection(ours) as (connection, transport):
            await _best(connection.data_received, keyd_requests(kind), total, rounds=1)
        if transport.answers < total or transport.non_200:
            raise BenchError(f"keyd answered {transport.answers} of {total}, {transport.non_200} not 200")


def count(total: int, kind: str) -> int:
    """Instructions valgrind counts for a whole process that feeds ``total`` requests."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise BenchError("valgrind is not installed (Debian: apt install valgrind)")
    command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += ["-m", "keyd.bench.instructions", "--feed", str(total), "--type", kind]
    # A fixed hash seed: the same dict layouts, hence the same instructions, in every run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, capture_output=True, env=env, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise BenchError(f"the run under valgrind failed: {done.stderr.decode(errors='replace')[-500:]}")
    return int(found.group(1))


def per_request(kind: str = "user", short: int = SHORT, long: int = LONG) -> float:
    """Instructions per request: the long run's count less the short run's, per extra request."""
    return (count(long, kind) - count(short, kind)) / (long - short)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyd.bench.instructions", description=__doc__)
    parser.add_argument("--type", choices=("user", "app"), default="user", help="token type (user)")
    parser.add_argument("--feed", type=int, help=argparse.SUPPRESS)  # the process valgrind runs
    args = parser.parse_args(argv)
    try:
        if args.feed is not None:
            loop_run(_feed(args.feed, args.type))
            return 0
        print(f"keyd in-process, {args.type} tokens: {per_request(args.type):,.0f} instructions per request")
    except BenchError as exc:
        print(f"keyd.bench.instructions: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
