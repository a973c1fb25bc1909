"""`keyd bench --plot FILE.png`: the picture of a run, matplotlib kept out of `keyd run`, and the
plot and table in docs/benchmarks.md from the recorded run's document."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from keyd import cli
from keyd.bench import command, plot
from keyd.bench.options import BenchError, Options

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "docs" / "bench" / "compare.json"


def _doc(**results: tuple[float, float]) -> dict[str, Any]:
    return {
        "machine": {"cpus": 2, "load_average": [0.5, 0.4]},
        "load": {"concurrency": 32, "duration": 10.0, "type": "user"},
        "results": {
            name: {"throughput": rps, "latency_ms": {"p50": p99 / 2, "p99": p99}}
            for name, (rps, p99) in results.items()
        },
    }


def test_draws_a_png_with_a_bar_per_target_in_run_order(tmp_path: Path) -> None:
    doc = _doc(keyd=(65000.0, 0.9), reference=(88000.0, 0.8), transit=(9000.0, 29.0))
    assert plot.bars(doc) == [("keyd", 65000.0, 0.9), ("reference", 88000.0, 0.8), ("transit", 9000.0, 29.0)]
    out = plot.draw(doc, tmp_path / "run.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width > 800 and height > 200
        # Not a blank canvas: keyd's bar is drawn in its own colour.
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20) or []}
    keyd_rgb = tuple(int(plot.KEYD_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    assert keyd_rgb in colours
    # One more target, a taller picture: one bar each.
    doc["results"]["pyjwt"] = {"throughput": 50000.0, "latency_ms": {"p99": 0.04}}
    with Image.open(plot.draw(doc, tmp_path / "more.png")) as bigger:
        assert bigger.size[1] > height


def test_the_title_says_what_was_run() -> None:
    doc = _doc(keyd=(1.0, 1.0))
    doc["ratios"] = {}
    assert plot.title(doc) == (
        "keyd bench --compare, user tokens, 32 connections, 10 s per target, 2 CPUs, load 0.5 at start"
    )
    rest = {"results": {}, "proxy_load": {}, "machine": {"cpus": 2, "load_average": [2.5, 2]}}
    assert plot.title(rest) == "keyd bench --rest, 2 CPUs, load 2.5 at start"


def test_a_document_without_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="no per-target results"):
        plot.draw({"inprocess": {}}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    saved = tmp_path / "memory.json"
    saved.write_text(json.dumps({"idle_rss_mb": 43}))
    assert plot.main([str(saved), str(tmp_path / "x.png")]) == 2


def test_plot_is_refused_for_measurements_without_targets_before_anything_runs() -> None:
    for options in (
        Options(plot="x.png", memory=True),
        Options(plot="x.png", startup=True),
        Options(plot="x.png", inprocess=True),
    ):
        with pytest.raises(BenchError, match="--plot draws runs under load"):
            command.run(options, io.StringIO())


def test_missing_matplotlib_is_named_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError
    ran: list[Options] = []

    def measure(options: Options, out: io.StringIO) -> tuple[dict[str, Any], bool]:
        ran.append(options)
        return {}, True

    monkeypatch.setattr(command, "measure", measure)
    with pytest.raises(BenchError, match=re.escape("pip install 'keyd[plot]'")):
        command.run(Options(plot="x.png"), io.StringIO())
    assert ran == []


def test_run_writes_the_plot_after_the_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc(keyd=(1000.0, 1.0))
    monkeypatch.setattr(command, "measure", lambda options, out: (doc, True))
    out = io.StringIO()
    target = tmp_path / "bench.png"
    assert command.run(Options(plot=str(target)), out) == (doc, True)
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"plot:      {target}" in out.getvalue()


def test_cli_passes_plot_through() -> None:
    args = cli.build_parser().parse_args(["bench", "--compare", "--plot", "out.png"])
    assert cli.bench_options(args).plot == "out.png"
    assert cli.bench_options(cli.build_parser().parse_args(["bench"])).plot == ""


def test_matplotlib_is_an_optional_extra_that_neither_keyd_run_nor_a_plain_bench_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("matplotlib" in dep for dep in project["dependencies"])
    assert any(dep.startswith("matplotlib") for dep in project["optional-dependencies"]["plot"])
    assert "keyd[plot]" in project["optional-dependencies"]["dev"]  # the test suite installs it
    script = (
        "import sys, keyd.cli, keyd.bench.command, keyd.bench.plot\n"
        "keyd.cli.build_parser().parse_args(['run', '-c', 'x.toml'])\n"
        "print(sorted(m for m in ('matplotlib', 'numpy', 'PIL') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"


def test_benchmarks_md_shows_the_recorded_run_and_its_plot(tmp_path: Path) -> None:
    """The results table is the recorded document's numbers; the picture is drawn from it."""
    doc = json.loads(RECORDED.read_text())
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "![keyd bench --compare: throughput and p99 per target](bench/compare.png)" in text
    assert f"load average {doc['machine']['load_average'][0]} at start" in text
    for name in ("keyd", "reference", "transit"):
        result = doc["results"][name]
        row = re.search(rf"^\| {name} +\| ([\d,]+) +\| ([\d.]+) +\| ([\d.]+) +\| (\d+) +\|$", text, re.M)
        assert row is not None, name
        assert int(row[1].replace(",", "")) == round(result["throughput"])
        assert float(row[2]) == pytest.approx(result["latency_ms"]["p50"], abs=0.006)
        assert float(row[3]) == pytest.approx(result["latency_ms"]["p99"], rel=0.01, abs=0.006)
        assert int(row[4]) == result["non_200"]
    ratio = doc["ratios"]["keyd/reference"]
    assert f"keyd/reference **{ratio:.2f}**" in text
    # The PNG in docs/ is a picture of this document (same size as one drawn now; the bytes can
    # differ with the matplotlib version).
    again = plot.draw(doc, tmp_path / "again.png")
    with Image.open(ROOT / "docs" / "bench" / "compare.png") as shipped, Image.open(again) as drawn:
        assert shipped.size == drawn.size
