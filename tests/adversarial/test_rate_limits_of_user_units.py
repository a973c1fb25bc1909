"""A rate under a ``unit`` grant is not multiplied by spreading requests over user units (review).

Rate buckets were keyed by (uid, unit, user_unit) whenever a grant named a unit. The grant fixes
the unit it names, but not the other one: under ``unit = "user@UID.service"`` (a unit the docs name
as a valid value: everything in that user's manager) the user creates as many units in its own
manager as it likes (``systemd-run --user``, or a cgroup it makes in its delegated subtree), and
each had a bucket of its own: N units, N times the rate. Now a bucket is the caller's uid (per
grant), whatever unit it calls from.

Root only: a real other uid via setpriv, its processes placed in real cgroups shaped like the
ones its user manager would create.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.support_peers import Cgroups, client_in_cgroup
from tests.conftest import base_config
from tests.integration.sysusers import SysUsers

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates users and cgroups, runs clients with setpriv"
)




def test_user_units_of_one_uid_share_the_rate_of_a_unit_grant(
    bao: Any,
    secret_path: tuple[str, str],
    keyd_factory: Any,
    short_dir: Path,
    users: SysUsers,
    cgroups: Cgroups,
) -> None:
    group = users.group("spread")
    account = users.user("spread", primary=group)
    name, uid = account.pw_name, account.pw_uid
    config = base_config(bao, short_dir, secret_path[0])
    config["server"]["socket_mode"] = "0666"
    manager = f"user.slice/user-{uid}.slice/user@{uid}.service"
    config["grant"] = [{"unit": f"user@{uid}.service", "types": ["user"], "rate": "1/m"}]
    keyd = keyd_factory(config)
    ask = [("POST", "/v1/tokens", {"user_id": "alice"})]
    tag = secrets.token_hex(3)
    statuses = []
    for i in range(5):  # the attack: one request from each of 5 units of the user's own manager
        got = client_in_cgroup(
            users, cgroups, f"{manager}/app.slice/spread{tag}-{i}.service", name, keyd.socket, ask
        )
        statuses.append(got["results"][0][0])
    # Positive control: the first request is served (the grant matches every unit of the manager).
    assert statuses[0] == 200
    # A burst of one per minute for the uid: the other units get 429, not a bucket each.
    assert statuses[1:] == [429] * 4, statuses
