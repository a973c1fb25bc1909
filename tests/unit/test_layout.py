"""The package's shape: keyd.daemon never imports operator or benchmark code, and no import cycles.

Imports are read from the source (module level and inside functions alike), so a lazy import
inside a function counts too: `keyd run` must not be able to reach keyd.ops or keyd.bench at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import keyd

ROOT = Path(keyd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every keyd module this file imports (``from keyd.x import y`` counts keyd.x.y if y is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("keyd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keyd"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in ROOT.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def test_the_graph_sees_the_packages() -> None:
    graph = _graph()
    assert "keyd.daemon.wiring" in graph
    assert "keyd.daemon.http.server" in graph["keyd.daemon.wiring"]


def test_daemon_never_imports_operator_benchmark_or_client_code() -> None:
    forbidden = ("keyd.ops", "keyd.bench", "keyd.cli", "keyd.client")
    offenders = {
        name: sorted(dep for dep in deps if dep.startswith(forbidden))
        for name, deps in _graph().items()
        if name.startswith("keyd.daemon")
    }
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_client_imports_errors_and_the_http_codec_only() -> None:
    """keyd.client is public and importable on its own: errors, and the HTTP/1.1 codec it shares with
    the benchmark's load generator, which itself imports nothing from keyd."""
    graph = _graph()
    assert graph["keyd.client"] <= {"keyd.errors", "keyd.http1"}
    assert graph["keyd.http1"] == set()


# `keyd run` enters through keyd.cli, which imports each command's module lazily: the graph above
# has an edge from keyd.cli to every one of them, so what `keyd run` loads is checked by running it.
_RUN = """
import sys
import keyd.cli
code = keyd.cli.main(["run", "-c", sys.argv[1]])
print(code, "keyd.daemon.wiring" in sys.modules)
print(" ".join(sorted(m for m in sys.modules if m.startswith(("keyd.ops", "keyd.bench", "keyd.client")))))
"""


def test_keyd_run_imports_no_operator_benchmark_or_client_module(tmp_path: Path) -> None:
    """Up to the daemon's start (its credential files are missing, so it stops there with exit 2)."""
    config = tmp_path / "keyd.toml"
    config.write_text(
        '[vault.auth]\nrole_id_file = "/nonexistent/role-id"\nsecret_id_file = "/nonexistent/secret-id"\n'
        '[apps.default]\napp_id = "t"\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(config)], capture_output=True, text=True, check=True, cwd=ROOT.parent
    )
    ran, loaded = done.stdout.splitlines()
    assert ran == "2 True", done.stderr  # refused at the file check, after importing the daemon
    assert "role_id_file: file '/nonexistent/role-id' does not exist" in done.stderr
    assert loaded == ""


def test_the_clis_client_commands_need_only_the_standard_library(tmp_path: Path) -> None:
    """`keyd health`, `keyd token` and `keyd status` as another user, where the checkout's venv is
    out of reach (a 0700 clone) and only the keyd package is on the path: no third-party module
    may be imported on the way (google-re2 was, through the config parser: a CI run from a
    `mktemp -d` clone failed on it). ``-S``: no site-packages at all."""
    socket_path = tmp_path / "none.sock"
    for command in (["health"], ["token", "--user-id", "alice"], ["status"]):
        done = subprocess.run(
            [sys.executable, "-S", "-m", "keyd", *command, "--socket", str(socket_path)],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
            check=False,
        )
        # keyd status exits 2 for an unreachable keyd (README, "Monitoring"), the others 1.
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done
        assert f"no keyd socket at {socket_path}" in done.stdout + done.stderr, done


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph or dep == "keyd":
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# -- per-package rules (docs/design.md, "Modules"): the tree carries the design's layers ---------

DAEMON = "keyd.daemon."


def _package(module: str) -> str | None:
    """keyd.daemon.http.connection -> "http"; a top-level daemon module -> None."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and module.startswith(DAEMON) else None


def _offenders(packages: set[str], allowed: set[str]) -> dict[str, list[str]]:
    """Modules of ``packages`` importing a keyd.daemon module outside ``allowed`` (module prefixes)."""
    found: dict[str, list[str]] = {}
    for name, deps in _graph().items():
        if _package(name) not in packages:
            continue
        bad = sorted(
            dep
            for dep in deps
            if dep.startswith(DAEMON) and not any(dep == a or dep.startswith(a + ".") for a in allowed)
        )
        if bad:
            found[name] = bad
    return found


def test_the_socket_layer_never_imports_signing_keys_policy_rest_or_observe() -> None:
    """http/ knows callers (the value type and who they are), not routes or keys."""
    allowed = {"keyd.daemon.http", "keyd.daemon.callers", "keyd.daemon.safefiles", "keyd.daemon.threads"}
    assert _offenders({"http"}, allowed) == {}


def test_callers_and_policy_import_nothing_above_them() -> None:
    allowed = {"keyd.daemon.callers", "keyd.daemon.policy", "keyd.daemon.threads"}
    assert _offenders({"callers", "policy"}, allowed) == {}


def test_the_key_side_never_imports_the_socket_layer_signing_or_the_rest_proxy() -> None:
    graph = _graph()
    bad = {
        name: sorted(d for d in deps if _package(d) in ("http", "signing", "rest"))
        for name, deps in graph.items()
        if _package(name) == "keys"
    }
    assert {name: deps for name, deps in bad.items() if deps} == {}


def test_the_packages_exist_and_are_seen() -> None:
    packages = {_package(name) for name in _graph()}
    assert {"http", "callers", "policy", "signing", "keys", "observe", "rest"} <= packages


def test_no_module_is_over_700_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in ROOT.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 700
    }
    assert long == {}, "split these"


def test_the_parser_imports_only_errors_and_its_values() -> None:
    """keyd.config is below everything that reads a config (the daemon, the commands); the disk
    checks of what it names sit above it, in keyd.config_files, for the commands to call."""
    graph = _graph()
    assert graph["keyd.config"] == {"keyd.config_values", "keyd.errors"}
    assert graph["keyd.config_values"] == set()
    assert graph["keyd.config_files"] == {"keyd.config"}
