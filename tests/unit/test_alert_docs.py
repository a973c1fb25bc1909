"""docs/operations.md lists the alerts of deploy/prometheus/keyd-alerts.yml as generated from the
file (tests/alert_docs.py), and holds no other copy of a rule."""

from __future__ import annotations

import re

import pytest
import yaml

from tests import alert_docs


def test_the_docs_list_is_the_rules_file_rendered() -> None:
    docs = alert_docs.DOCS.read_text()
    expected = alert_docs.expected_docs(docs, alert_docs.RULES.read_text())
    assert docs == expected, (
        "docs/operations.md's alerts differ from the rules file: run python -m tests.alert_docs"
    )


def test_every_alert_is_listed_once_with_its_expression() -> None:
    rules = yaml.safe_load(alert_docs.RULES.read_text())
    section = alert_docs.render(rules)
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert section.count(f"| `{rule['alert']}` |") == 1, rule["alert"]
            assert alert_docs._cell(rule["expr"]) in section


def test_no_rule_text_outside_the_generated_list() -> None:
    """The old hand-kept YAML copy is gone: no `alert:`/`expr:` line and no alert name in the docs
    except in the generated list and the prose that names alerts."""
    docs = alert_docs.DOCS.read_text()
    head, _, rest = docs.partition(alert_docs.BEGIN)
    _, _, tail = rest.partition(alert_docs.END)
    outside = head + tail
    assert not re.search(r"^\s*-?\s*(alert|expr):", outside, re.M)
    names = {
        rule["alert"] for g in yaml.safe_load(alert_docs.RULES.read_text())["groups"] for rule in g["rules"]
    }
    for name in re.findall(r"\bKeyd[A-Z]\w+", outside):
        assert name in names, f"the docs name an alert the rules file does not have: {name}"


def test_a_changed_rule_changes_the_expected_docs() -> None:
    docs = alert_docs.DOCS.read_text()
    rules = alert_docs.RULES.read_text()
    changed = rules.replace("keyd_app_key_stale == 1", "keyd_app_key_stale > 0", 1)
    assert changed != rules
    assert alert_docs.expected_docs(docs, changed) != docs
    with pytest.raises(ValueError, match="lost the markers"):
        alert_docs.expected_docs(docs.replace(alert_docs.END, ""), rules)
