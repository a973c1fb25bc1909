"""docs/operations.md's list of alerts, generated from deploy/prometheus/keyd-alerts.yml.

The docs carry no copy of the rules to drift: between the two markers below they hold this
rendering of the file (name, severity, expression, ``for``, description), and
tests/unit/test_alert_docs.py fails when they differ. After editing the rules, rewrite the docs
with ``python -m tests.alert_docs``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "keyd-alerts.yml"
DOCS = ROOT / "docs" / "operations.md"
BEGIN = (
    "<!-- generated from deploy/prometheus/keyd-alerts.yml by `python -m tests.alert_docs`:"
    " edit the rules file, not this list -->"
)
END = "<!-- end of the generated list of alerts -->"
GROUP_TITLES = {
    "keyd": "Every keyd",
    "keyd-rest": "With the REST proxy, for a grant of type `rest`",
    "keyd-transit": "With apps signing through Vault Transit",
}


def _cell(text: str) -> str:
    """Table-safe: one line, pipes escaped (they are common in PromQL regexes)."""
    return " ".join(text.split()).replace("|", "\\|")


def render(rules: dict[str, Any]) -> str:
    """The generated part of the docs, markers included."""
    out = [BEGIN]
    for group in rules["groups"]:
        out += ["", f"**{GROUP_TITLES.get(group['name'], group['name'])}** (group `{group['name']}`):", ""]
        out += ["| alert | severity | fires when | for | what it means, what to do |"]
        out += ["|-------|----------|------------|-----|---------------------------|"]
        for rule in group["rules"]:
            out.append(
                f"| `{rule['alert']}` | {rule['labels']['severity']} | `{_cell(rule['expr'])}` "
                f"| {rule.get('for', 'at once')} | {_cell(rule['annotations']['description'])} |"
            )
    out += ["", END]
    return "\n".join(out)


def expected_docs(docs: str, rules_text: str) -> str:
    """``docs`` with its generated part rendered anew from ``rules_text``."""
    head, begin, rest = docs.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{DOCS.name} has lost the markers of its generated list of alerts")
    return head + render(yaml.safe_load(rules_text)) + tail


def main() -> int:
    docs = DOCS.read_text()
    updated = expected_docs(docs, RULES.read_text())
    if updated != docs:
        DOCS.write_text(updated)
        print(f"rewrote the list of alerts in {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
