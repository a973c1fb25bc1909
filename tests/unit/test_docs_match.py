"""The docs name what the code does: error codes, log events and fields, metrics, referenced tests.

Each test reads the code (statically) and the Markdown table that documents it, and fails on a name
that is in one and not the other, so a new error code, event or metric cannot ship undocumented and
a renamed test cannot leave docs/security.md pointing at nothing.
"""

from __future__ import annotations

import io
import json
import logging
import re
import textwrap
import tomllib
from pathlib import Path

import pytest

from keyd import config, logs
from keyd.errors import ConfigError
from tests.helpers import ROOT

DAEMON = sorted((ROOT / "keyd" / "daemon").rglob("*.py"))


def _code_text(paths: list[Path]) -> str:
    return "\n".join(p.read_text() for p in paths)


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after ``heading``, header and rule skipped."""
    start = markdown.index(heading)
    rows: list[list[str]] = []
    in_table = False
    for line in markdown[start:].splitlines()[1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif in_table:
            break
    return rows[1:]


# -- error codes: README "Errors" ------------------------------------------------------------


def _error_codes_in_code() -> dict[str, set[int]]:
    text = _code_text(DAEMON)
    found: dict[str, set[int]] = {}
    patterns = [
        r"ApiError\(\s*(\d{3}),\s*\"(\w+)\"",
        r"(?:_raw_response|error_answer)\(\s*(\d{3}),\s*\"(\w+)\"",
        r"_(?:reject|fail)\(\s*(\d{3}),\s*\"(\w+)\"",
        r"Response\(\s*(\d{3}),\s*error_body\(\s*\"(\w+)\"",
        r"code = \"(\w+)\"\s*\n\s*response = Response\((\d{3})",
        r"^\s+\w+: \((\d{3}), \"(\w+)\"\),$",  # api.REFUSALS: Forbidden: (403, "forbidden"),
    ]
    for pattern in patterns:
        for match in re.finditer(pattern, text, re.MULTILINE):
            a, b = match.groups()
            status, code = (int(a), b) if a.isdigit() else (int(b), a)
            found.setdefault(code, set()).add(status)
    # Codes held in a constant: ApiError(503, _KEY_UNAVAILABLE, ...).
    for match in re.finditer(r"ApiError\(\s*(\d{3}),\s*([A-Z_]+),", text):
        constant = re.search(rf"^{match.group(2)} = \"(\w+)\"", text, re.MULTILINE)
        assert constant, match.group(2)
        found.setdefault(constant.group(1), set()).add(int(match.group(1)))
    return found


def _error_codes_in_readme() -> dict[str, set[int]]:
    documented: dict[str, set[int]] = {}
    for cells in _table_rows((ROOT / "README.md").read_text(), "### Errors"):
        for code in re.findall(r"`(\w+)`", cells[1]):
            documented.setdefault(code, set()).add(int(cells[0]))
    return documented


def test_every_error_code_keyd_answers_is_in_the_readme_table_and_no_other() -> None:
    code, readme = _error_codes_in_code(), _error_codes_in_readme()
    # The scan finds the codes of each layer: this test must not pass on an empty scan.
    assert {"forbidden", "key_unavailable", "bad_request", "uri_too_long", "upstream_timeout"} <= set(code)
    assert sorted(set(code) - set(readme)) == [], "answered by keyd, missing from README's error table"
    assert sorted(set(readme) - set(code)) == [], "in README's error table, never answered by keyd"
    wrong = {c: (sorted(code[c]), sorted(readme[c])) for c in code if not code[c] <= readme[c]}
    assert wrong == {}, "code: (statuses keyd answers with, statuses README gives)"


# -- log events and JSON fields: docs/operations.md "Logs" -----------------------------------


def _events_in_code() -> set[str]:
    text = _code_text(sorted((ROOT / "keyd").rglob("*.py")))
    events = set(re.findall(r"\"event\": \"(\w+)\"", text))
    # refresher._log_failure picks the event in a variable: level, event = logging.X, "word".
    events |= set(re.findall(r"level, event = logging\.\w+, \"(\w+)\"", text))
    return events


def test_every_log_event_is_in_the_operations_table_and_no_other() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    documented = {
        re.sub(r"`", "", cells[0]) for cells in _table_rows(operations, "Each of these is logged once")
    }
    events = _events_in_code()
    assert {"loaded", "rotation", "degraded", "refresh_failed", "unavailable", "login"} <= events
    assert sorted(events - documented) == [], "logged by keyd, missing from docs/operations.md"
    assert sorted(documented - events) == [], "in docs/operations.md, never logged by keyd"


def test_every_extra_field_the_code_logs_reaches_the_json_line() -> None:
    text = _code_text(sorted((ROOT / "keyd").rglob("*.py")))
    passed: set[str] = set()
    for block in re.findall(r"extra\s*=\s*\{([^}]*)\}", text):
        passed |= set(re.findall(r"\"(\w+)\":", block))
    assert {"event", "app", "node"} <= passed
    assert sorted(passed - set(logs.EXTRA_FIELDS)) == [], "passed as extra= but dropped by logs.JsonFormatter"
    operations = (ROOT / "docs" / "operations.md").read_text()
    documented = {
        re.sub(r"`", "", cells[0]) for cells in _table_rows(operations, '`format = "json"` writes one JSON')
    }
    assert sorted(set(logs.EXTRA_FIELDS) - documented) == [], "JSON fields missing from docs/operations.md"


def test_a_vault_node_failure_line_names_the_node_in_json() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("keyd.test_docs_match")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "node failed",
            extra={"event": "vault_node_failed", "node": "https://vault-2.example.com:8200", "error": "x"},
        )
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "vault_node_failed"
    assert line["node"] == "https://vault-2.example.com:8200"


# -- metrics: docs/operations.md "Metrics" ---------------------------------------------------


def _metric_families_in_code() -> set[str]:
    text = _code_text(DAEMON)
    names = set()
    for kind, name in re.findall(r"(Counter|Gauge|Histogram)MetricFamily\(\s*\"(keyd_\w+)\"", text):
        names.add(f"{name}_total" if kind == "Counter" else name)
    # metrics._counter(name, text, value) wraps CounterMetricFamily for the Vault totals.
    for name in re.findall(r"_counter\(\s*\"(keyd_\w+)\"", text):
        names.add(f"{name}_total")
    return names


def test_every_metric_is_in_the_operations_table_and_no_other() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    documented = {
        re.sub(r"`", "", cells[0]) for cells in _table_rows(operations, "## Metrics") if "keyd_" in cells[0]
    }
    code = _metric_families_in_code()
    assert {"keyd_requests_total", "keyd_refresh_failures_total", "keyd_rest_retries_total"} <= code
    assert sorted(code - documented) == [], "exported by keyd, missing from docs/operations.md"
    assert sorted(documented - code) == [], "in docs/operations.md, never exported by keyd"


# -- tests the docs point at -----------------------------------------------------------------


def test_every_test_the_docs_name_exists() -> None:
    tests = sorted((ROOT / "tests").rglob("*.py"))
    by_name: dict[str, list[Path]] = {}
    for path in tests:
        by_name.setdefault(path.name, []).append(path)
    missing: list[str] = []
    docs = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        current: Path | None = None  # "...::name" and "::name" continue the file named last
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            for token in re.findall(r"`([^`\s]+)`", line):
                match = re.fullmatch(
                    r"((?:tests/)?[\w/]*test_\w+\.py|\.\.\.)?(?:::(\w+)(?:\[[\w-]+\])?)?", token
                )
                if not match or not any(match.groups()):
                    continue
                file, function = match.groups()
                where = f"{doc.relative_to(ROOT)}:{lineno}: {token}"
                if file and file != "...":
                    candidates = [ROOT / file] if "/" in file else by_name.get(file, [])
                    candidates = [c for c in candidates if c.exists()]
                    if len(candidates) != 1:
                        missing.append(f"{where} (file {'missing' if not candidates else 'ambiguous'})")
                        current = None
                        continue
                    current = candidates[0]
                if function and (current is None or not re.search(rf"def {function}\b", current.read_text())):
                    missing.append(where)
    assert missing == []


# -- modules: docs/design.md "Modules" -------------------------------------------------------


def test_every_module_is_in_the_design_table() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    named: set[str] = set()
    for cells in _table_rows(design, "## Modules"):
        named |= set(re.findall(r"`([\w/]+\.py)`", cells[0]))
    package = ROOT / "keyd"
    modules = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts
    }
    assert {"cli.py", "daemon/http/server.py", "bench/rest.py"} <= modules
    assert sorted(modules - named) == [], "modules missing from docs/design.md's table"
    assert sorted(named - modules) == [], "in docs/design.md's table, no such module"


# -- TOML snippets in the docs ---------------------------------------------------------------


def test_every_toml_snippet_in_the_docs_is_a_valid_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A snippet an operator copies must not hold an unknown key or a bad value (an app is added
    when the snippet has none; names this host lacks, such as the group keyd-clients, are allowed)."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    docs = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    problems: list[str] = []
    for doc in docs:
        for match in re.finditer(r"```toml\n(.*?)```", doc.read_text(), re.DOTALL):
            block = textwrap.dedent(match.group(1))
            where = f"{doc.relative_to(ROOT)} (snippet at offset {match.start()})"
            try:
                data = tomllib.loads(block)
            except tomllib.TOMLDecodeError as exc:
                problems.append(f"{where}: not TOML: {exc}")
                continue
            data.setdefault("apps", {"default": {"app_id": "tXXXXXXX"}})
            try:
                config.parse(data, where)
            except ConfigError as exc:
                problems += [p for p in exc.problems if "on this host" not in p]
            checked += 1
    assert checked >= 5
    assert problems == []
