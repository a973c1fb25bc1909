"""``keyd bench --plot FILE.png``: a run's throughput and p99 latency per target, as a picture.

Drawn from the run's report document (the one ``--json`` prints), so a saved document can be drawn
again later: ``python -m keyd.bench.plot RESULTS.json FILE.png``. matplotlib is the optional extra
``keyd[plot]``; only this module imports it, and only when a plot is asked for, so neither ``keyd
run`` nor a bench without ``--plot`` loads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyd.bench.options import BenchError

INSTALL_HINT = "--plot needs matplotlib: pip install 'keyd[plot]' (or pip install matplotlib)"
KEYD_COLOUR = "#2b6cb0"
OTHER_COLOUR = "#a0aec0"
# Targets whose latency is not a round trip over a socket: marked on the p99 side.
IN_PROCESS = ("pyjwt",)


def require_matplotlib() -> None:
    """Fail before a run that would end without its plot."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise BenchError(INSTALL_HINT) from None


def title(doc: dict[str, Any]) -> str:
    """What the run was: mode, token type, connections, time per target, machine."""
    load = doc.get("load", {})
    mode = "--rest" if "proxy_load" in doc else "--compare" if "ratios" in doc else "load"
    parts = [f"keyd bench {mode}"]
    if load.get("type"):
        parts.append(f"{load['type']} tokens")
    if load.get("concurrency"):
        parts.append(f"{load['concurrency']} connections")
    if load.get("duration"):
        parts.append(f"{load['duration']:g} s per target")
    elif load.get("requests"):
        parts.append(f"{load['requests']:,} requests per target")
    machine = doc.get("machine", {})
    if machine.get("cpus"):
        average = machine.get("load_average") or ["?"]
        parts.append(f"{machine['cpus']} CPUs, load {average[0]} at start")
    return ", ".join(parts)


def bars(doc: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(target, requests per second, p99 ms) in the order the run measured them."""
    results = doc.get("results")
    if not isinstance(results, dict) or not results:
        raise BenchError("the report has no per-target results to plot (--plot draws load runs)")
    return [
        (name, float(result["throughput"]), float(result["latency_ms"]["p99"]))
        for name, result in results.items()
    ]


def draw(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the PNG for ``doc`` to ``path``: throughput on the left, p99 on the right."""
    require_matplotlib()
    import matplotlib  # noqa: PLC0415 - optional extra, see the module doc

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.ticker  # noqa: PLC0415
    from matplotlib import pyplot  # noqa: PLC0415

    rows = bars(doc)
    names = [name + (" (in-process)" if name in IN_PROCESS else "") for name, _, _ in rows]
    colours = [KEYD_COLOUR if name == "keyd" else OTHER_COLOUR for name, _, _ in rows]
    figure, (left, right) = pyplot.subplots(
        1, 2, figsize=(11, 1.6 + 0.55 * len(rows)), sharey=True, layout="constrained"
    )
    try:
        for axes, values, label, fmt in (
            (left, [r[1] for r in rows], "throughput (requests/s, higher is better)", "{:,.0f}"),
            (right, [r[2] for r in rows], "p99 latency (ms, lower is better)", "{:.2f}"),
        ):
            drawn = axes.barh(names, values, color=colours)
            axes.bar_label(drawn, labels=[fmt.format(v) for v in values], padding=3, fontsize=9)
            axes.set_xlabel(label)
            axes.set_xlim(0, max(values, default=0) * 1.25 or 1)
            axes.grid(axis="x", alpha=0.3)
            axes.spines[["top", "right"]].set_visible(False)
        left.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        p99_target = doc.get("targets", {}).get("p99_ms", {}).get("target")
        if p99_target:
            right.axvline(p99_target, color="#c53030", linestyle="--", linewidth=1)
            right.annotate(
                f"keyd's p99 target {p99_target:g} ms",
                (p99_target, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                color="#c53030",
                fontsize=8,
            )
        left.invert_yaxis()  # first measured on top
        figure.suptitle(title(doc), fontsize=10)
        out = Path(path)
        # No "Software" line: the same document draws the same bytes.
        figure.savefig(out, format="png", dpi=100, metadata={"Software": None})
    finally:
        pyplot.close(figure)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keyd.bench.plot RESULTS.json FILE.png``: draw a saved ``keyd bench --json`` run."""
    parser = argparse.ArgumentParser(prog="python -m keyd.bench.plot", description=main.__doc__)
    parser.add_argument("results", help="a document printed by keyd bench --json")
    parser.add_argument("png", help="where to write the picture")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(Path(args.results).read_text())
        print(draw(doc, args.png))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"keyd bench plot: cannot draw {args.results}: {exc}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"keyd bench plot: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
