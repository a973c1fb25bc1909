"""What `keyd bench` is asked (cli.py builds Options from its arguments) and how it fails."""

from __future__ import annotations

from dataclasses import dataclass

from keyd.errors import KeydError

DEFAULT_CONCURRENCY = 32
DEFAULT_DURATION = 10.0
WARMUP_SECONDS = 1.0


class BenchError(KeydError):
    """The benchmark could not run (no keyd on the socket, OpenBao missing, a server died)."""


@dataclass
class Options:
    """``keyd bench`` options (cli.py parses them)."""

    socket: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    requests: int | None = None
    duration: float | None = None
    kind: str = "user"
    json: bool = False
    compare: bool = False
    vault_address: str = ""
    memory: bool = False
    startup: bool = False
    inprocess: bool = False
    warmup: float = WARMUP_SECONDS
    rest: bool = False
    scale: bool = False  # throughput against grants, apps and open connections (keyd.bench.scale)
    plot: str = ""  # a PNG of the run's throughput and p99 per target (keyd.bench.plot)
