"""deploy/prometheus/keyd-alerts.yml under Debian's promtool: `check rules` accepts it, and `test
rules` runs the unit tests in keyd-alerts.test.yml, which show every alert silent and firing.

How the rules behave against a real keyd and a real Prometheus through a Vault outage is
tests/resilience/test_dashboards.py; that the docs' alert section is generated from this file is
tests/unit/test_alert_docs.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import prometheus
from tests.helpers import ROOT

RULES = ROOT / "deploy" / "prometheus" / "keyd-alerts.yml"
UNIT_TESTS = Path(__file__).with_name("keyd-alerts.test.yml")


def rules() -> dict[str, dict[str, Any]]:
    """Every alerting rule of the file by name."""
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def runnable(tests: dict[str, Any], directory: Path) -> Path:
    """The unit tests as promtool runs them: each expected alert gets its rule's description, and
    rule_files points at the rules wherever the copy is written."""
    filled = copy.deepcopy(tests)
    filled["rule_files"] = [str(RULES)]
    by_name = rules()
    for case in filled["tests"]:
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                annotations = alert.setdefault("exp_annotations", {})
                annotations["description"] = by_name[check["alertname"]]["annotations"]["description"]
    path = directory / "keyd-alerts.test.yml"
    path.write_text(yaml.safe_dump(filled, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def unit_tests() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(UNIT_TESTS.read_text())
    return loaded


def test_promtool_check_rules_accepts_the_file() -> None:
    done = prometheus.promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check can fail: the same file with one expression that does not parse."""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("keyd_app_can_sign == 0", "keyd_app_can_sign == ", 1))
    done = prometheus.promtool("check", "rules", str(broken))
    assert done.returncode != 0
    assert "KeydCannotSign" in done.stdout + done.stderr or "parse error" in done.stdout + done.stderr


def test_every_alert_is_unit_tested_silent_and_firing(unit_tests: dict[str, Any]) -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in unit_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(rules()) == fires, set(rules()) ^ fires
    assert set(rules()) == silent, set(rules()) ^ silent


def test_every_alert_says_what_it_means_and_how_bad_it_is() -> None:
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        description = rule["annotations"]["description"]
        # Written once, in the rules file (the unit tests copy it): so it holds no template.
        assert "{{" not in description and len(description) > 40, name
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name


def test_promtool_test_rules_passes(unit_tests: dict[str, Any], tmp_path: Path) -> None:
    done = prometheus.promtool("test", "rules", str(runnable(unit_tests, tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(unit_tests: dict[str, Any], tmp_path: Path) -> None:
    """The unit tests can fail: one expected summary changed."""
    wrong = copy.deepcopy(unit_tests)
    first = next(
        alert
        for case in wrong["tests"]
        for check in case["alert_rule_test"]
        for alert in check.get("exp_alerts") or []
    )
    first["exp_annotations"]["summary"] += " (not what the rule says)"
    done = prometheus.promtool("test", "rules", str(runnable(wrong, tmp_path)))
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr
