"""Metrics on a Unix socket of their own: readable by its group, not by every local user.

``[metrics] listen`` on TCP is readable by every local user (no peer credentials on TCP) and tells
when a Vault outage would stop signing. ``[metrics] socket`` serves ``GET /metrics`` on a Unix
socket with its own mode and group. Real keyd, real OpenBao, real users via setpriv: one in the
metrics group reads the metrics, one outside it (but in the main socket's group) cannot connect.
"""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from keyd import config as keyd_config
from keyd.errors import ConfigError
from tests.conftest import base_config
from tests.integration.sysusers import SysUsers

READ = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b"\r\n", 1)[0].decode(), b"keyd_requests_total" in data)
"""



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs clients as them")
def test_the_metrics_socket_is_readable_by_its_group_only(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, keyd_factory: Any, users: SysUsers
) -> None:
    main_group = users.group("msock")
    metrics_group = users.group("mread")
    scraper = users.user("mscrape", primary=metrics_group)
    other = users.user("mother", primary=main_group)
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0660", socket_group=main_group)
    metrics_path = str(short_dir / "metrics.sock")
    config["metrics"] = {"socket": metrics_path, "socket_mode": "0660", "socket_group": metrics_group}
    keyd = keyd_factory(config)

    def read_as(user: str) -> str:
        done = subprocess.run(
            [*users.as_user(user), users.python(user), "-c", READ, metrics_path],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.strip()

    assert read_as(scraper.pw_name) == "HTTP/1.1 200 OK True"
    assert read_as(other.pw_name) == "refused 13"  # EACCES: not in the metrics socket's group
    st = os.stat(metrics_path)
    assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == grp.getgrnam(metrics_group).gr_gid
    # The metrics socket serves nothing but /metrics.
    status, _, _ = keyd.http().request("GET", "/v1/health")
    assert status == 200
    keyd.stop()
    assert not os.path.exists(metrics_path), "removed on shutdown"


def test_listen_and_socket_together_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        keyd_config.parse(
            {
                "vault": {"auth": {"method": "token"}},
                "apps": {"default": {"app_id": "t"}},
                "metrics": {"listen": "127.0.0.1:9464", "socket": str(tmp_path / "m.sock")},
            },
            "x.toml",
        )
    assert "x.toml: metrics.socket" in str(caught.value) and "not both" in str(caught.value)
