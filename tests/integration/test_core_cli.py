"""The command line as a user runs it: check-config, token, health (python -m keyd ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt

from keyd.ops.dev import BaoServer
from tests.conftest import base_config
from tests.helpers import ROOT, KeydProcess, to_toml


def keyd_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "KEYD_SOCKET")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "keyd", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        cwd=ROOT,
    )


# -- check-config -------------------------------------------------------------------------------


def test_check_config_ok(bao: BaoServer, short_dir: Path) -> None:
    file = short_dir / "ok.toml"
    file.write_text(to_toml(base_config(bao, short_dir, "talkjs/x")))
    result = keyd_cli("check-config", "-c", str(file), env={"VAULT_TOKEN": "s.x"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{file}: ok (1 app(s): default)"
    assert result.stderr == ""


def test_check_config_lists_every_problem_with_file_and_key(short_dir: Path) -> None:
    file = short_dir / "bad.toml"
    file.write_text(
        "[server]\nsocket_mode = 'rw'\nsokcet = '/x'\n\n"
        "[vault.auth]\nmethod = 'approle'\n\n"
        "[refresh]\ninterval = 'often'\n\n"
        "[apps.default]\napp_id = 'tX'\nkv_version = 3\nuser_ttl = '2d'\n"
    )
    result = keyd_cli("check-config", "-c", str(file))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    keys = [line.split(": ")[1] for line in lines]
    assert all(line.startswith(f"{file}: ") for line in lines), lines
    assert keys == [
        "server.socket_mode",
        "server.sokcet",
        "refresh.interval",
        "apps.default.kv_version",
        "apps.default.user_ttl",
    ]


def test_check_config_reports_missing_credential_files(short_dir: Path) -> None:
    file = short_dir / "files.toml"
    file.write_text(
        to_toml(
            {
                "vault": {
                    "auth": {
                        "method": "approle",
                        "role_id_file": str(short_dir / "role-id"),
                        "secret_id_file": str(short_dir / "secret-id"),
                    }
                },
                "apps": {"default": {"app_id": "tX"}},
            }
        )
    )
    (short_dir / "role-id").write_text("r")
    result = keyd_cli("check-config", "-c", str(file))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"{file}: vault.auth.secret_id_file: file {str(short_dir / 'secret-id')!r} does not exist"
    ]


def test_check_config_on_a_missing_or_broken_file(short_dir: Path) -> None:
    result = keyd_cli("check-config", "-c", str(short_dir / "absent.toml"))
    assert (result.returncode, result.stderr.strip()) == (2, f"{short_dir / 'absent.toml'}: file not found")
    broken = short_dir / "broken.toml"
    broken.write_text("[apps.default\n")
    result = keyd_cli("check-config", "-c", str(broken))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{broken}: not valid TOML")


def test_run_refuses_a_bad_config_with_exit_2(short_dir: Path) -> None:
    file = short_dir / "bad.toml"
    file.write_text("[apps.default]\napp_id = 'tX'\nkv_version = 7\n")
    result = keyd_cli("run", "-c", str(file))
    assert result.returncode == 2
    assert result.stderr.strip() == f"{file}: apps.default.kv_version: must be 1 or 2"


def test_the_example_config_loads() -> None:
    from keyd import config

    cfg = config.load(ROOT / "config.example.toml")
    assert cfg.apps["default"].app_id
    # check-config also looks for the credential files, which only exist on a real host.
    result = keyd_cli("check-config", "-c", str(ROOT / "config.example.toml"))
    assert result.returncode in (0, 2)
    assert all("file" in line and "does not exist" in line for line in result.stderr.splitlines()), (
        result.stderr
    )


# -- token and health against a running keyd -----------------------------------------------------


def test_token_and_health_commands(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    path, key = secret_path
    config = base_config(bao, short_dir, path)
    config["grant"] = [{"uid": os.getuid(), "types": ["user", "app"]}]
    keyd: KeydProcess = keyd_factory(config)
    sock = keyd.socket

    result = keyd_cli("token", "--socket", sock, "--user-id", "alice", "--ttl", "120")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), key, algorithms=["HS256"])
    assert (claims["sub"], claims["exp"] - claims["iat"]) == ("alice", 120)

    result = keyd_cli("token", "--app-token", "--json", env={"KEYD_SOCKET": sock})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["type"], doc["key_version"]) == ("app", 1)
    assert jwt.decode(doc["token"], key, algorithms=["HS256"])["tokenType"] == "app"

    result = keyd_cli("token", "--socket", sock, "--user-id", "alice", "--ttl", "999999")
    assert result.returncode == 1
    assert "invalid_field, HTTP 422" in result.stderr and "exceeds" in result.stderr
    assert result.stdout == ""

    result = keyd_cli("token", "--socket", sock, "--user-id", "alice", "--app", "nope")
    assert result.returncode == 1 and "unknown_app" in result.stderr

    result = keyd_cli("token", "--socket", sock)
    assert result.returncode == 2 and "exactly one of --user-id" in result.stderr

    result = keyd_cli("health", "--socket", sock)
    assert result.returncode == 0, result.stderr
    health = json.loads(result.stdout)
    assert health["status"] == "ok" and health["apps"]["default"]["key_version"] == 1

    for output in (result.stdout, result.stderr):
        assert key not in output


def test_token_and_health_without_a_daemon(short_dir: Path) -> None:
    missing = str(short_dir / "none.sock")
    result = keyd_cli("health", "--socket", missing)
    assert result.returncode == 1
    assert result.stderr.strip() == f"keyd: no keyd socket at {missing}"
    result = keyd_cli("health", "--live", "--socket", missing)
    assert result.returncode == 1, "no answer: not alive"
    result = keyd_cli("token", "--socket", missing, "--user-id", "a")
    assert result.returncode == 1 and "no keyd socket" in result.stderr


def test_health_command_exits_1_when_keyd_cannot_sign(
    bao: BaoServer, keyd_factory: Any, short_dir: Path
) -> None:
    keyd = keyd_factory(base_config(bao, short_dir, "talkjs/never-written"), wait_ready=False)
    keyd.wait_health(503)
    result = keyd_cli("health", "--socket", keyd.socket)
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "starting"
    # The liveness probe's form: keyd answers, so it is alive, though it cannot sign yet.
    result = keyd_cli("health", "--live", "--socket", keyd.socket)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "starting"
