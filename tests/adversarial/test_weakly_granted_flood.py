"""A uid whose grant refuses everything it asks cannot starve other uids either (adversarial review).

The grantless cap (max_connections_without_grant) did not apply to a uid with one useless grant
(``user_id_pattern = "^nobody$"``): 256 connections of refused requests made another uid's fresh
connection wait 9-11 s. Refusals now have a budget per uid (200, then 100 a second): beyond it
every refused answer closes its connection and the uid meets the grantless cap. The flood
reconnects whenever keyd closes a connection, as an attacker would. Real keyd, real OpenBao, a
real other uid (setpriv); the bound is generous for a busy machine (docs/benchmarks.md has the
measured p99).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from keyd.bench import flood
from tests.adversarial.support_server import flood_while_timing
from tests.conftest import base_config
from tests.integration.sysusers import SysUsers


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a user and runs the flood as it")
def test_a_weakly_granted_flood_does_not_starve_another_uids_fresh_connections(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, keyd_factory: Any, users: SysUsers
) -> None:
    group = users.group("flood")
    attacker = users.user("flooder", primary=group)
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0660", socket_group=group)
    config["grant"] = [
        {"uid": os.getuid(), "types": ["user"]},
        {"uid": attacker.pw_uid, "types": ["user"], "user_id_pattern": "^nobody$"},
    ]
    keyd = keyd_factory(config)
    flood.victim(keyd.socket, count=3, pause=0.02)  # this uid's names are cached, as in production
    result, measured = flood_while_timing(users, attacker.pw_name, keyd.socket, 256, reconnect=True)
    # The flood ran throughout: refused answers came back, and keyd closed connection after
    # connection once the uid's refusal budget was spent.
    assert result["bytes_received"] > 100_000 and result["closed_by_keyd"] > 256, result
    assert measured["p99_ms"] < 500, measured
    status, _ = keyd.http().get_json("/v1/health")
    assert status == 200
