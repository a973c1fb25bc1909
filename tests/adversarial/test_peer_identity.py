"""Attacks on who keyd thinks is calling, run for real (root: other uids via setpriv, real cgroups).

Each test runs the attack a local user would and asserts it fails, next to a positive control
that shows the same setup does grant what it should:

- a unit spoofed from a user's own systemd manager (cgroup path shaped like
  ``user@UID.service/app.slice/<unit>``) does not match ``unit =``; the same unit under
  ``system.slice`` does; ``user_unit`` with the uid matches the manager's unit;
- 500 forked processes of one uid share one rate bucket;
- groups are the process's own: dropped groups are lost, groups given only to the process count;
- a kept-alive connection loses its grant after a group deletion (within the identity cache
  time) and after a config change plus SIGHUP.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.adversarial.support_peers import FORKS, Cgroups, KeptAlive, client_in_cgroup, groups_of
from tests.conftest import base_config
from tests.helpers import to_toml, wait_until
from tests.integration.sysusers import SysUsers

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates users, groups and cgroups, runs clients with setpriv"
)

TOKENS = "/v1/tokens"




def _open_socket(config: dict[str, Any]) -> dict[str, Any]:
    config["server"]["socket_mode"] = "0666"  # any local user may connect: grants alone decide
    return config


def _claims(result: list[Any]) -> dict[str, Any]:
    status, doc = result
    assert status == 200, doc
    claims: dict[str, Any] = jwt.decode(doc["token"], options={"verify_signature": False})
    return claims


def _code(result: list[Any]) -> tuple[int, str]:
    status, doc = result
    return status, doc["error"]["code"] if status != 200 else "ok"


# -- (a) a unit spoofed from a user's systemd manager ------------------------------------------


def test_a_unit_named_in_a_users_own_manager_is_not_that_unit(
    bao: Any,
    secret_path: tuple[str, str],
    keyd_factory: Any,
    short_dir: Path,
    users: SysUsers,
    cgroups: Cgroups,
) -> None:
    path, key = secret_path
    group = users.group("sync")
    account = users.user("sync", primary=group)
    name, uid = account.pw_name, account.pw_uid
    unit = f"talkjs-sync-{secrets.token_hex(3)}.service"  # unique: never a real unit of this host
    audit_file = short_dir / "audit.log"
    config = _open_socket(base_config(bao, short_dir, path))
    config["audit"] = {"file": str(audit_file)}
    config["grant"] = [
        {"unit": unit, "types": ["app"]},  # the README's old app-token grant shape
        {"uid": uid, "user_unit": unit, "types": ["user"], "user_id_pattern": "^uu-[a-z]+$"},
    ]
    keyd = keyd_factory(config)
    manager = f"user.slice/user-{uid}.slice/user@{uid}.service"
    asks = [("POST", TOKENS, {"type": "app"}), ("POST", TOKENS, {"user_id": "uu-alice"})]

    # The attack: `systemd-run --user --unit=<unit>` puts the process here.
    spoofed = client_in_cgroup(users, cgroups, f"{manager}/app.slice/{unit}", name, keyd.socket, asks)
    app, user = spoofed["results"]
    assert _code(app) == (403, "forbidden"), "a user's own manager must not mint the unit's app tokens"
    # user_unit with the uid: the unit inside this user's own manager matches grant[1].
    assert _claims(user)["sub"] == "uu-alice"

    # Positive control: the same unit run by the system manager gets its app token.
    system = client_in_cgroup(users, cgroups, f"system.slice/{unit}", name, keyd.socket, asks)
    app, user = system["results"]
    assert _claims(app)["tokenType"] == "app"
    jwt.decode(app[1]["token"], key, algorithms=["HS256"], issuer="tTestApp")
    assert _code(user) == (403, "forbidden")  # grant[0] decides: app tokens only

    # user_unit counts only in the caller's own manager: the same names under another uid's
    # manager (a setuid program started there) and another unit in its own manager match nothing.
    other = f"user.slice/user-{uid + 1}.slice/user@{uid + 1}.service/app.slice/{unit}"
    for where in (other, f"{manager}/app.slice/other-{unit}", f"{manager}/session.slice/{unit}/sub"):
        got = client_in_cgroup(users, cgroups, where, name, keyd.socket, asks)
        codes = [_code(r) for r in got["results"]]
        expected_user = "ok" if where.endswith("/sub") else "forbidden"
        assert codes[0] == (403, "forbidden"), where
        assert codes[1][1] == expected_user, (where, codes)

    # The audit log records the unit as sd_pid_get_unit names it.
    def lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in audit_file.read_text().splitlines()] if audit_file.exists() else []

    wait_until(lambda: len(lines()) >= 10, what="audit lines")
    by_pid = {r["pid"]: r["unit"] for r in lines()}
    assert by_pid[spoofed["pid"]] == f"user@{uid}.service"
    assert by_pid[system["pid"]] == unit


# -- (b) rate limits per process, bypassed by forking ------------------------------------------


def test_forking_a_process_per_request_does_not_multiply_the_rate(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers
) -> None:
    path, _ = secret_path
    group = users.group("fork")
    forker = users.user("fork", primary=group)
    other = users.user("forkpc", primary=group)
    config = _open_socket(base_config(bao, short_dir, path))
    config["grant"] = [{"group": group, "types": ["user"], "rate": "10/s"}]
    keyd = keyd_factory(config)
    done = subprocess.run(
        [*users.as_user(forker.pw_name), users.python(forker.pw_name), "-c", FORKS, keyd.socket, "500"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    statuses, seconds = result["statuses"], result["seconds"]
    served = statuses.count(200)
    assert len(statuses) == 500
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    # One bucket for the uid: a burst of 10, then 10 per second of the run (plus scheduling slack).
    assert 10 <= served <= 10 + 10 * seconds + 10, (served, seconds)
    # Positive control: another uid under the same grant has its own bucket.
    got = users.client(other.pw_name, keyd.socket, [("POST", TOKENS, {"user_id": "u2"})] * 3)
    assert [s for s, _ in got["results"]] == [200, 200, 200]


# -- (c) groups: the process's own, not /etc/group's --------------------------------------------


def test_groups_are_the_ones_the_process_has(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers
) -> None:
    path, _ = secret_path
    granted = users.group("grp")
    member_primary = users.group("mem")
    outsider_primary = users.group("out")
    member = users.user("mem", primary=member_primary, extra=(granted,)).pw_name
    outsider = users.user("out", primary=outsider_primary).pw_name
    config = _open_socket(base_config(bao, short_dir, path))
    config["grant"] = [{"group": granted, "types": ["user"]}]
    keyd = keyd_factory(config)
    ask = [("POST", TOKENS, {"user_id": "g1"})]

    def run(prefix: list[str], user: str) -> tuple[int, str]:
        done = subprocess.run(
            [*prefix, users.python(user), "-c", _CLIENT_WITH_GROUPS, keyd.socket, json.dumps(ask)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        return _code(out["results"][0])

    granted_gid = grp.getgrnam(granted).gr_gid
    # Positive control: a member started with its groups from /etc/group.
    assert run(users.as_user(member), member) == (200, "ok")
    # The attack that used to work: a member that dropped its groups still matched.
    cleared = ["setpriv", f"--reuid={member}", f"--regid={member_primary}", "--clear-groups"]
    assert run(cleared, member) == (403, "forbidden")
    # Not a member in /etc/group, but the process has the group (systemd's SupplementaryGroups=).
    given = ["setpriv", f"--reuid={outsider}", f"--regid={outsider_primary}", f"--groups={granted_gid}"]
    assert run(given, outsider) == (200, "ok")
    assert run(users.as_user(outsider), outsider) == (403, "forbidden")


# Like sysusers.CLIENT, plus the groups the process really had (a check on the setup itself).
_CLIENT_WITH_GROUPS = r"""
import http.client, json, os, socket, sys
path, requests = sys.argv[1], json.loads(sys.argv[2])
out = {"pid": os.getpid(), "groups": os.getgroups(), "results": []}
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(path)
conn = http.client.HTTPConnection("keyd")
conn.sock = sock
for method, url, payload in requests:
    conn.request(method, url, body=json.dumps(payload), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    out["results"].append([response.status, json.loads(response.read())])
print(json.dumps(out))
"""


# -- (d) kept-alive connections: group deletion, config change + SIGHUP -------------------------


def _status_until(client: KeptAlive, want: int, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    status = 0
    while time.monotonic() - started < timeout:
        status, _ = client.ask({"user_id": "k1"})
        if status == want:
            break
        time.sleep(0.1)
    return status, time.monotonic() - started


def test_a_kept_alive_connection_loses_a_deleted_groups_grant_within_the_cache_time(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers
) -> None:
    path, _ = secret_path
    granted = users.group("kag")
    primary = users.group("kap")
    member = users.user("kam", primary=primary, extra=(granted,)).pw_name
    config = _open_socket(base_config(bao, short_dir, path))
    config["server"]["identity_cache"] = "1s"
    config["grant"] = [{"group": granted, "types": ["user"]}]
    keyd = keyd_factory(config)
    client = KeptAlive([*users.as_user(member), users.python(member)], keyd.socket)
    try:
        assert client.ask({"user_id": "k1"})[0] == 200  # positive control, and the connection is open
        gid = max(groups_of(client.pid))
        subprocess.run(["groupdel", granted], check=True, capture_output=True)
        users.groups.remove(granted)
        assert gid in groups_of(client.pid), "the process keeps the gid; only the name is gone"
        status, after = _status_until(client, 403, timeout=15)
        assert status == 403, "the deleted group's grant still decided on a kept-alive connection"
        assert after < 1.0 + 4.0, after  # identity_cache (1 s) plus sweeper and thread slack
    finally:
        client.close()


def test_a_kept_alive_connection_follows_a_config_change_after_sighup(
    bao: Any, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path, users: SysUsers
) -> None:
    path, _ = secret_path
    primary = users.group("kh")
    account = users.user("kh", primary=primary)
    config = _open_socket(base_config(bao, short_dir, path))
    config["grant"] = [{"uid": account.pw_uid, "types": ["user"]}]
    keyd = keyd_factory(config)
    client = KeptAlive([*users.as_user(account.pw_name), users.python(account.pw_name)], keyd.socket)
    try:
        assert client.ask({"user_id": "k1"})[0] == 200
        # A broken file first: the grants in use stay, and the log says why.
        keyd.config_path.write_text(to_toml(config) + "\n[[grant]]\nunit = 'not a unit'\n")
        keyd.signal(signal.SIGHUP)
        wait_until(lambda: "grants not reloaded" in keyd.logs(), what="the refused reload")
        assert "grant[1].unit" in keyd.logs()
        assert client.ask({"user_id": "k1"})[0] == 200
        # The grant is gone from the file: after SIGHUP the same connection is refused.
        config["grant"] = [{"uid": 0, "types": ["user"]}]
        keyd.config_path.write_text(to_toml(config))
        keyd.signal(signal.SIGHUP)
        wait_until(lambda: "1 grant(s) reloaded" in keyd.logs(), what="the reload")
        status, body = client.ask({"user_id": "k1"})
        assert (status, body["error"]["code"]) == (403, "forbidden")
        # And back: a grant added by a reload reaches it too.
        config["grant"] = [{"uid": account.pw_uid, "types": ["user"]}]
        keyd.config_path.write_text(to_toml(config))
        keyd.signal(signal.SIGHUP)
        wait_until(lambda: keyd.logs().count("1 grant(s) reloaded") >= 2, what="the second reload")
        assert client.ask({"user_id": "k1"})[0] == 200
    finally:
        client.close()
