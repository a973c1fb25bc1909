"""The installable clients (clients/node, clients/php) with their real runtimes against a live keyd.

Each is installed the way the README says (``npm install ./clients/node``; a composer path
repository), then its own tests run: ``node --test`` (tokens verified with jsonwebtoken) and a PHP
script (signatures checked with hash_hmac), against a keyd on OpenBao whose REST proxy goes to the
strict TalkJS stand-in. Afterwards the stand-in must have received exactly the proxied calls the
clients' tests made, and keyd's refusals (403) none. Their tests also run them against hostile fake
servers (huge, malformed, endless answers; dropped connections) without keyd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_config
from tests.helpers import ROOT

CLIENTS = ROOT / "clients"
APP_ID = "tTestApp"


@pytest.fixture
def live(bao, secret_path, keyd_factory, short_dir) -> Iterator[object]:
    """keyd granting this uid everything, the proxy limited to GET and PUT /users/*."""
    from tests.talkjs_standin import StandIn

    path, key = secret_path
    with StandIn(key, APP_ID, short_dir) as standin:
        config = base_config(bao, short_dir, path)
        config["apps"]["default"]["rest"] = {"base_url": standin.url, "ca_file": str(standin.ca)}
        config["grant"] = [
            {
                "uid": os.getuid(),
                "types": ["user", "app", "signature", "webhook", "rest"],
                "rest": ["PUT /users/*", "GET /users/*"],
            }
        ]
        proc = keyd_factory(config)
        proc.key = key
        proc.standin = standin
        yield proc


def client_env(live, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KEYD_SOCKET"}
    return {**env, "KEYD_SOCKET": live.socket, "KEYD_TEST_KEY": live.key, "KEYD_TEST_APP_ID": APP_ID, **extra}


def proxied(live) -> list[tuple[str, str]]:
    assert live.standin.problems() == []
    return [(r.method, r.path) for r in live.standin.received]


# -- Node.js --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_project(npm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project that installed the package as the README says, plus jsonwebtoken and TypeScript."""
    project = tmp_path_factory.mktemp("node-project")
    (project / "package.json").write_text('{"private": true}\n')
    command = [npm, "install", "--no-audit", "--no-fund", "--install-links", str(CLIENTS / "node")]
    command += ["jsonwebtoken@9", "typescript@5", "@types/node@20"]
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (
        f"npm install failed (the npm registry is assumed reachable): {done.stderr[-2000:]}"
    )
    installed = project / "node_modules" / "keyd-client"
    assert not installed.is_symlink(), "--install-links: the packed package, as from a registry"
    assert sorted(p.name for p in installed.iterdir()) == [
        "README.md",
        "index.d.ts",
        "index.js",
        "package.json",
    ]
    return project


def node_tests(node: str, project: Path, env: dict[str, str], *files: str) -> str:
    """Run ``node --test`` on the package's test files; every test must run and pass (no skips)."""
    tests = [str(CLIENTS / "node" / "test" / name) for name in files]
    env = {**env, "NODE_PATH": str(project / "node_modules")}
    done = subprocess.run(
        [node, "--test", *tests], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    summary = dict(re.findall(r"^# (tests|pass|fail|skipped|todo|cancelled) (\d+)$", done.stdout, re.M))
    assert done.returncode == 0 and summary.get("fail") == "0", done.stdout[-4000:] + done.stderr[-2000:]
    assert summary["tests"] == summary["pass"] and int(summary["pass"]) >= 5, summary
    return done.stdout


def test_node_client_against_live_keyd(node, node_project, live):
    out = node_tests(node, node_project, client_env(live), "live.test.js")
    assert "# pass 8" in out  # every test in live.test.js
    # Exactly the proxied calls the tests made reached TalkJS; the refused DELETE and the bad id did not.
    assert proxied(live) == [
        ("PUT", f"/v1/{APP_ID}/users/alice"),
        ("GET", f"/v1/{APP_ID}/users/bob%20smith%20%C3%A9"),
    ]
    assert json.loads(live.standin.received[0].body) == {"name": "Alice"}


def test_node_client_against_hostile_servers(node, node_project, short_dir):
    env = {k: v for k, v in os.environ.items() if k != "KEYD_SOCKET"}
    node_tests(node, node_project, {**env, "TMPDIR": str(short_dir)}, "hostile.test.js")


def test_node_types_describe_the_package(node, node_project):
    """index.d.ts compiles a typical TypeScript use under --strict (and rejects a wrong method)."""
    shutil.copy(CLIENTS / "node" / "test" / "types-check.ts", node_project / "types-check.ts")
    tsc = [node, str(node_project / "node_modules" / "typescript" / "bin" / "tsc")]
    command = [*tsc, "--noEmit", "--strict", "--types", "node", "types-check.ts"]
    done = subprocess.run(command, cwd=node_project, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_node_examples_use_the_package():
    for name in ("backend.js", "sync-users.js"):
        text = (ROOT / "examples" / "node" / name).read_text()
        assert "require('../../clients/node')" in text, name
        assert "http.request" not in text, f"{name} should not carry its own copy of the client"


# -- PHP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def php_project(php: str, composer: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project that requires keyd/client through a composer path repository, as the README says."""
    done = subprocess.run(
        [composer, "validate", "--strict", "--no-interaction"],
        cwd=CLIENTS / "php",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    project = tmp_path_factory.mktemp("php-project")
    manifest = {
        "repositories": [
            {"type": "path", "url": str(CLIENTS / "php"), "options": {"symlink": False}},
            {"packagist.org": False},  # nothing else is needed: keyd/client has no dependencies
        ],
        "require": {"keyd/client": "*@dev"},
    }
    (project / "composer.json").write_text(json.dumps(manifest, indent=2))
    env = {**os.environ, "COMPOSER_ALLOW_SUPERUSER": "1", "COMPOSER_HOME": str(project / ".composer")}
    done = subprocess.run(
        [composer, "install", "--no-interaction", "--no-progress"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / "vendor" / "keyd" / "client" / "src" / "Client.php").is_file()
    return project


def php_tests(php: str, project: Path, env: dict[str, str], group: str) -> str:
    # exception_ignore_args=0: traces carry arguments, so a body passed along would show in them.
    command = [php, "-d", "zend.exception_ignore_args=0", "-d", "error_reporting=-1"]
    command += [str(CLIENTS / "php" / "tests" / "run.php"), str(project / "vendor" / "autoload.php"), group]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    summary = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", done.stdout, re.M))
    assert done.returncode == 0 and summary.get("fail") == "0", done.stdout[-4000:] + done.stderr[-2000:]
    assert summary["tests"] == summary["pass"] and int(summary["pass"]) >= 5, summary
    assert "Warning" not in done.stderr and "Deprecated" not in done.stderr, done.stderr
    return done.stdout


def test_php_client_against_live_keyd(php, php_project, live):
    out = php_tests(php, php_project, client_env(live), "live")
    assert "# pass 8" in out  # every test in run.php's live group
    assert proxied(live) == [
        ("PUT", f"/v1/{APP_ID}/users/alice"),
        ("GET", f"/v1/{APP_ID}/users/bob%20smith%20%C3%A9"),
    ]
    assert json.loads(live.standin.received[0].body) == {"name": "Alice"}


def test_php_client_against_hostile_servers(php, php_project, short_dir):
    env = {k: v for k, v in os.environ.items() if k != "KEYD_SOCKET"}
    php_tests(php, php_project, {**env, "TMPDIR": str(short_dir)}, "hostile")


def test_php_examples_use_the_package():
    for name in ("keyd.php", "sync-users.php"):
        text = (ROOT / "examples" / "php" / name).read_text()
        assert "require __DIR__ . '/autoload.php';" in text and "Keyd\\Client" in text, name
        assert "curl_init" not in text, f"{name} should not carry its own copy of the client"
