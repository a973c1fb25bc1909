"""keyd in its own PID namespace (as in a pod whose containers do not share one): callers from
another namespace have pid 0 at the socket, so a `unit` grant cannot match them and a `uid`
grant does; the audit line says pid 0 (issue 21: "in a pod, grants are by uid and groups").

Real parts: keyd started under `unshare --pid --fork --mount-proc` on a real OpenBao, a real
other uid (setpriv) placed in a real cgroup named like a system unit, so that outside the
namespace its unit would be that one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.support_peers import Cgroups, client_in_cgroup
from tests.conftest import base_config
from tests.helpers import KeydProcess
from tests.integration.sysusers import SysUsers

UNIT = "keyd-podtest.service"



@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_callers_from_another_pid_namespace_match_uid_grants_not_unit_grants(
    bao: Any,
    root: Any,
    secret_path: tuple[str, str],
    short_dir: Path,
    users: SysUsers,
    cgroups: Cgroups,
    keyd_procs: list[KeydProcess],
) -> None:
    group = users.group("podns")
    caller = users.user("podcaller", primary=group)
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0666")
    config["audit"] = {"file": str(short_dir / "audit.log")}
    config["grant"] = [
        # Would match outside a PID namespace: the caller runs in system.slice/UNIT as this uid.
        {"uid": caller.pw_uid, "unit": UNIT, "types": ["user", "app"]},
        {"uid": caller.pw_uid, "types": ["user"]},
    ]
    token = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    keyd = KeydProcess(
        short_dir,
        config,
        {"VAULT_TOKEN": token},
        # --kill-child: keyd dies with unshare, should unshare ever be killed (it was left running).
        prefix=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"),
    )
    keyd_procs.append(keyd)
    keyd.start()
    result = client_in_cgroup(
        users,
        cgroups,
        f"system.slice/{UNIT}",
        caller.pw_name,
        keyd.socket,
        [["POST", "/v1/tokens", {"user_id": "alice"}], ["POST", "/v1/tokens", {"type": "app"}]],
    )
    (user_status, _), (app_status, app_doc) = result["results"]
    assert user_status == 200, "the uid grant matches"
    assert app_status == 403 and app_doc["error"]["code"] == "forbidden", "the unit grant does not"
    # unshare ignores SIGTERM while it waits for its child: SIGTERM keyd itself (its namespace's
    # PID 1, which takes the signal since it handles it), and unshare returns with it.
    assert keyd.process is not None
    unshare = keyd.process.pid
    (child,) = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
    os.kill(int(child), signal.SIGTERM)
    assert keyd.stop() == 0
    lines = [json.loads(line) for line in (short_dir / "audit.log").read_text().splitlines()]
    mine = [line for line in lines if line.get("uid") == caller.pw_uid]
    assert mine and all(line["pid"] == 0 and line["unit"] == "" for line in mine), mine
