"""What a run reports: latency percentiles and throughput per target, the machine, the ratios
between targets and the targets they are held to, as text lines and as the JSON document."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

# The targets on a 2-core machine, concurrency 32, client in its own process.
TARGET_VS_TRANSIT = 4.0
TARGET_VS_REFERENCE = 0.7
TARGET_P99_MS = 3.0
TARGET_TRANSIT_VS_KV = 0.7  # issue 18: keyd in transit mode against keyd in KV mode (aim 0.9)
TARGET_TRANSIT_VS_UNBATCHED = 5.0  # ... and against one Transit call per token
TARGET_TRANSIT_P99_MS = 5.0
TARGET_IDLE_RSS_MB = 50.0
TARGET_GROWTH_MB = 5.0
TARGET_READY_S = 1.0


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


@dataclass
class Result:
    """What one target did under load: counts by status and the latency distribution."""

    name: str
    requests: int
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    note: str = ""
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU µs per request, by part (CpuMeter)
    transit_calls: int = 0  # a transit keyd's Transit calls during the run, and the inputs they carried
    transit_inputs: int = 0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def non_200(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + self.connection_errors

    @classmethod
    def from_latencies(
        cls, name: str, latencies: list[float], seconds: float, statuses: dict[int, int], errors: int
    ) -> Result:
        ordered = sorted(latencies)
        ms = 1000.0
        return cls(
            name=name,
            requests=len(ordered),
            seconds=seconds,
            statuses=dict(sorted(statuses.items())),
            connection_errors=errors,
            p50_ms=percentile(ordered, 0.50) * ms,
            p90_ms=percentile(ordered, 0.90) * ms,
            p99_ms=percentile(ordered, 0.99) * ms,
            max_ms=(ordered[-1] if ordered else 0.0) * ms,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput, 1),
            "non_200": self.non_200,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "connection_errors": self.connection_errors,
            "latency_ms": {
                "p50": round(self.p50_ms, 3),
                "p90": round(self.p90_ms, 3),
                "p99": round(self.p99_ms, 3),
                "max": round(self.max_ms, 3),
            },
            **({"cpu_us_per_request": {k: round(v, 1) for k, v in self.cpu_us.items()}} if self.cpu_us else {}),
            **(
                {"transit_calls": self.transit_calls, "transit_inputs": self.transit_inputs}
                if self.transit_calls
                else {}
            ),
            **({"note": self.note} if self.note else {}),
        }

    def line(self) -> str:
        text = (
            f"{self.name:<10} {self.throughput:>10,.0f} req/s  "
            f"p50 {self.p50_ms:6.2f}  p90 {self.p90_ms:6.2f}  p99 {self.p99_ms:6.2f}  "
            f"max {self.max_ms:7.2f} ms  non-200 {self.non_200}  ({self.requests:,} in {self.seconds:.1f}s)"
        )
        if self.cpu_us:
            parts = "  ".join(f"{part} {us:.1f}" for part, us in self.cpu_us.items())
            text += f"\n{'':<10} cpu/req µs: {parts}  (total {sum(self.cpu_us.values()):.1f})"
        if self.transit_calls:
            text += (
                f"\n{'':<10} Transit calls: {self.transit_calls:,}, "
                f"{self.transit_inputs / self.transit_calls:.1f} inputs a call on average"
            )
        return text


def machine() -> dict[str, Any]:
    """What the numbers were measured on (cores, load, Python, event loop)."""
    import platform  # noqa: PLC0415

    load1, load5, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(load1, 2), round(load5, 2)],
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def ratios(results: dict[str, Result]) -> tuple[dict[str, float], dict[str, Any]]:
    """keyd's throughput over each other target's, and whether each target of the issue is met."""
    keyd = results["keyd"]
    by_target = {
        f"keyd/{name}": round(keyd.throughput / r.throughput, 3) if r.throughput else 0.0
        for name, r in results.items()
        if name != "keyd"
    }
    targets = {
        "throughput_vs_transit": {
            "target": TARGET_VS_TRANSIT,
            "got": by_target.get("keyd/transit"),
            "met": by_target.get("keyd/transit", 0) >= TARGET_VS_TRANSIT,
        },
        "throughput_vs_reference": {
            "target": TARGET_VS_REFERENCE,
            "got": by_target.get("keyd/reference"),
            "met": by_target.get("keyd/reference", 0) >= TARGET_VS_REFERENCE,
        },
        "p99_ms": {
            "target": TARGET_P99_MS,
            "got": round(keyd.p99_ms, 3),
            "met": keyd.p99_ms <= TARGET_P99_MS,
        },
        "no_errors": {"target": 0, "got": keyd.non_200, "met": keyd.non_200 == 0},
    }
    batched = results.get("keyd-transit")
    if batched is not None:  # issue 18's targets for transit mode
        unbatched = results.get("transit")
        vs_kv = round(batched.throughput / keyd.throughput, 3) if keyd.throughput else 0.0
        vs_transit = round(batched.throughput / unbatched.throughput, 3) if unbatched and unbatched.throughput else 0.0
        by_target["keyd-transit/keyd"] = vs_kv
        by_target["keyd-transit/transit"] = vs_transit
        targets["transit_mode_vs_kv"] = {"target": TARGET_TRANSIT_VS_KV, "got": vs_kv, "met": vs_kv >= TARGET_TRANSIT_VS_KV}
        targets["transit_mode_vs_unbatched"] = {
            "target": TARGET_TRANSIT_VS_UNBATCHED,
            "got": vs_transit,
            "met": vs_transit >= TARGET_TRANSIT_VS_UNBATCHED,
        }
        targets["transit_mode_p99_ms"] = {
            "target": TARGET_TRANSIT_P99_MS,
            "got": round(batched.p99_ms, 3),
            "met": batched.p99_ms <= TARGET_TRANSIT_P99_MS,
        }
        targets["transit_mode_no_errors"] = {"target": 0, "got": batched.non_200, "met": batched.non_200 == 0}
    return by_target, targets


def ratio_lines(by_target: dict[str, float], targets: dict[str, Any]) -> list[str]:
    """The two text lines ``--compare`` ends with: the ratios, and each target met or MISSED."""
    lines = ["ratios:    " + "   ".join(f"{name} {value:.2f}x" for name, value in by_target.items())]
    marks = []
    for name, t in targets.items():
        marks.append(f"{name} {'met' if t['met'] else 'MISSED'} ({t['got']} vs {t['target']})")
    lines.append("targets:   " + "; ".join(marks))
    return lines
