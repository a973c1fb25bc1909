"""deploy/grafana/keyd.json as Grafana reads it: one Prometheus data source variable, job/instance/app
variables every query honours, panels that do not overlap, and a panel for every metric keyd
documents and every metric of this round's contract.

That every query parses and returns data from a real keyd is tests/resilience/test_dashboards.py.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from tests.helpers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "keyd.json"
OPERATIONS = ROOT / "docs" / "operations.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table"}
# The metric names added this round (the team's contract) and their labels: the dashboard shows
# them once they exist.
CONTRACT = {
    "keyd_app_key_source": {"app", "source"},
    "keyd_transit_batch_size": set(),
    "keyd_transit_calls_total": {"outcome"},
    "keyd_transit_call_seconds": set(),
    "keyd_transit_items_total": {"app", "outcome"},
    "keyd_vault_secret_id_ttl_seconds": set(),
    "keyd_reload_success": set(),
    "keyd_reload_timestamp_seconds": set(),
}
# A metric name followed by its label selector in a query.
SELECTOR = re.compile(r"\b((?:keyd|process)_[a-z_]+|up)\{([^}]*)\}")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel.get("targets", [])]


def queried_metrics() -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", name) for expr in queries() for name, _ in SELECTOR.findall(expr)}


def documented_metrics() -> set[str]:
    """The metrics table of docs/operations.md (`process_*` aside)."""
    return set(re.findall(r"^\| `(keyd_[a-z_]+)` \|", OPERATIONS.read_text(), re.M))


def test_it_is_a_dashboard_grafana_imports_with_any_prometheus() -> None:
    doc = dashboard()
    assert doc["uid"] == "keyd" and doc["title"] == "keyd"
    assert isinstance(doc["schemaVersion"], int) and doc["schemaVersion"] >= 36
    variables = {var["name"]: var for var in doc["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "app"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "app"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*"
        assert re.fullmatch(r"label_values\(keyd_app_can_sign(\{.*\})?, *" + name + r"\)", var["query"]["query"])
    # Each variable narrows by the ones before it.
    assert '{job=~"$job"}' in variables["instance"]["query"]["query"]
    assert 'instance=~"$instance"' in variables["app"]["query"]["query"]


def test_panels_have_unique_ids_and_titles_and_a_prometheus_query_each() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in panels()]
    assert len(titles) == len(set(titles)), titles
    for panel in panels():
        assert panel["type"] in PANEL_TYPES, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert len(panel["description"]) > 20, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]


def test_every_query_honours_the_job_and_instance_variables() -> None:
    for expr in queries():
        selectors = SELECTOR.findall(expr)
        assert selectors, expr
        for name, labels in selectors:
            assert 'job=~"$job"' in labels and 'instance=~"$instance"' in labels, (name, expr)
            if name.startswith("keyd_") and "app" in _labels_of(name):
                assert 'app=~"$app"' in labels, (name, expr)
        assert "[$__rate_interval]" in expr or "[" not in expr, expr  # ranges follow the scrape interval


def _labels_of(metric: str) -> set[str]:
    """The labels docs/operations.md (or the contract) gives a metric."""
    family = re.sub(r"_(bucket|count|sum)$", "", metric)
    if family in CONTRACT:
        return CONTRACT[family]
    row = re.search(rf"^\| `{family}` \| \w* \| ([^|]*) \|", OPERATIONS.read_text(), re.M)
    return set(re.findall(r"`(\w+)`", row[1])) if row else set()


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = []
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert 1 <= grid["w"] <= 24 and grid["x"] + grid["w"] <= 24 and grid["h"] >= 1, panel["title"]
        boxes.append((panel["title"], grid))
    for (a, p), (b, q) in itertools.combinations(boxes, 2):
        apart = (
            p["x"] + p["w"] <= q["x"]
            or q["x"] + q["w"] <= p["x"]
            or p["y"] + p["h"] <= q["y"]
            or q["y"] + q["h"] <= p["y"]
        )
        assert apart, (a, b)


def test_every_documented_and_contract_metric_has_a_panel() -> None:
    documented = documented_metrics()
    assert len(documented) > 20  # the table was found
    assert documented - queried_metrics() == set()
    assert set(CONTRACT) - queried_metrics() == set()
    assert queried_metrics() - documented - set(CONTRACT) <= {"up", "process_resident_memory_bytes", "process_cpu_seconds_total"}


def test_the_issue_asks_for_these_panels() -> None:
    """The issue's list, each by the metric that answers it."""
    wanted = {
        "can sign per app": "keyd_app_can_sign",
        "key age": "keyd_app_key_age_seconds",
        "staleness": "keyd_app_key_stale",
        "tokens per second by type and outcome": "keyd_tokens_total",
        "refusals by code": "keyd_refusals_total",
        "latency quantiles": "keyd_request_duration_seconds",
        "Vault node state": "keyd_vault_node_up",
        "failovers": "keyd_vault_failovers_total",
        "token TTL remaining": "keyd_vault_token_ttl_seconds",
        "REST proxy calls": "keyd_rest_requests_total",
        "upstream latency": "keyd_rest_upstream_seconds",
        "transit batches": "keyd_transit_batch_size",
    }
    for what, metric in wanted.items():
        assert metric in queried_metrics(), what
    by_type = [e for e in queries() if "keyd_tokens_total" in e]
    assert any("sum by (type, outcome)" in e for e in by_type)
    assert any("sum by (code)" in e for e in queries() if "keyd_refusals_total" in e)
    quantiles = [e for e in queries() if "keyd_request_duration_seconds_bucket" in e]
    assert sorted(re.search(r"histogram_quantile\(([\d.]+)", e)[1] for e in quantiles) == ["0.5", "0.9", "0.99"]  # type: ignore[index]


def test_the_docs_point_at_the_dashboard() -> None:
    text = OPERATIONS.read_text()
    assert "deploy/grafana/keyd.json" in text
    assert Path(DASHBOARD).exists()
