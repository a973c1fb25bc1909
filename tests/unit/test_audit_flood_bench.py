"""The refusal-flood measurement (python -m keyd.bench.audit_flood) runs and holds its target."""

from __future__ import annotations

import json

import pytest

from keyd.bench import audit_flood


def test_the_flood_bench_reports_a_bounded_audit_log(capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_flood.main(["--requests", "3000", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["refused_answers"] == doc["answers"] == 3000
    assert doc["accounted"] == 3000
    assert doc["audit_lines"]["refused"] >= 1 and doc["folded"] > 0
    assert doc["audit_bytes"] <= doc["target_bytes"]
