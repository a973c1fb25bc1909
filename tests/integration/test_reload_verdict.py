"""Honest reloads: a SIGHUP that cannot apply the config file says so everywhere (issue 22).

Real keyd on a real OpenBao. `keyd reload` (keyd.service's ExecReload=) exits 1 with the reason,
/v1/health's `reload` section and `keyd status` show it, the metrics say keyd_reload_success 0,
and the old grants keep serving; after a fix the same commands say it worked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import base_config
from tests.helpers import to_toml


def _keyd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keyd", *args], capture_output=True, text=True, timeout=90, check=False)


def test_a_failed_reload_is_reported_by_keyd_reload_health_status_and_metrics(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, keyd_factory: Any
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    keyd = keyd_factory(config)
    http = keyd.http()
    assert "reload" not in http.get_json("/v1/health")[1]  # none yet
    assert b"keyd_reload_success" not in http.request("GET", "/metrics")[2]

    keyd.config_path.write_text(to_toml(config) + "\n[[grant]]\nunit = 'not a unit'\n")
    failed = _keyd("reload", "--pid", str(keyd.pid), "--socket", keyd.socket)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "keyd reload failed, keeping what it had" in failed.stderr and "grant[0].unit" in failed.stderr
    doc = http.get_json("/v1/health")[1]
    assert doc["reload"]["ok"] is False and doc["reload"]["count"] == 1 and "grant[0].unit" in doc["reload"]["error"]
    status = _keyd("status", "--socket", keyd.socket)
    assert status.returncode == 1 and "last reload" in status.stdout and "FAILED" in status.stdout
    assert b"keyd_reload_success 0.0" in http.request("GET", "/metrics")[2]
    assert http.post_json("/v1/tokens", {"user_id": "a"})[0] == 200  # the old config still serves

    keyd.config_path.write_text(to_toml(config))
    fixed = _keyd("reload", "--pid", str(keyd.pid), "--socket", keyd.socket)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert http.get_json("/v1/health")[1]["reload"] == {**http.get_json("/v1/health")[1]["reload"], "ok": True, "count": 2}
    assert _keyd("status", "--socket", keyd.socket).returncode == 0
    assert b"keyd_reload_success 1.0" in http.request("GET", "/metrics")[2]
