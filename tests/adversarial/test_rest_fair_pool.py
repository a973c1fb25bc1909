"""One uid's slow REST calls do not make another uid wait (adversarial round two).

The proxy's upstream pool (``rest.max_connections``, 16) was shared first come, first served: two
uids each holding ``max_concurrent`` (8) slow calls filled it, and a third uid's fast call waited
for one of them to end (1.7 s behind 2 s calls). Slots are now shared fairly (FairSlots: a share
always stays free for a uid that holds none), so the third uid is answered at once.

Real parts: a real keyd on a real OpenBao, the strict HTTPS stand-in for TalkJS answering the
slow calls after 2 s, two real unprivileged uids (setpriv) each running 8 slow calls in their own
processes, and this test's uid as the third caller.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config
from tests.helpers import Http
from tests.integration.sysusers import CLIENT, SysUsers
from tests.talkjs_standin import StandIn

SLOW = 2.0
PER_UID = 8



@pytest.fixture
def standin(secret_path: tuple[str, str], short_dir: Path) -> Iterator[StandIn]:
    with StandIn(secret_path[1], "tTestApp", short_dir, max_lifetime=10) as server:
        yield server


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs clients as them")
def test_two_uids_slow_calls_do_not_hold_up_a_third_uids_call(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, standin: StandIn, keyd_factory: Any, users: SysUsers
) -> None:
    group = users.group("fpool")
    slow = [users.user("fslowa", primary=group), users.user("fslowb", primary=group)]
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0660", socket_group=group)
    config["apps"]["default"]["rest"] = {
        "base_url": standin.url,
        "ca_file": str(standin.ca),
        "token_ttl": 10,
        "timeout": "10s",
        "retries": 0,
    }
    rules = ["GET /users/*"]
    config["grant"] = [{"uid": u.pw_uid, "types": ["rest"], "rest": rules} for u in slow]
    config["grant"].append({"uid": os.getuid(), "types": ["rest"], "rest": rules})
    keyd = keyd_factory(config)
    standin.delay_for = lambda path: SLOW if "/users/slow" in path else 0.0
    processes = [
        subprocess.Popen(
            [
                *users.as_user(user.pw_name),
                users.python(user.pw_name),
                "-c",
                CLIENT,
                keyd.socket,
                json.dumps([["GET", f"/v1/rest/default/users/slow{i}", None]]),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for user in slow
        for i in range(PER_UID)
    ]
    try:
        deadline = time.monotonic() + 10
        while standin.in_flight < 10 and time.monotonic() < deadline:  # most slow calls are upstream
            time.sleep(0.02)
        time.sleep(0.2)  # and the rest are queued in keyd
        assert standin.in_flight >= 10, standin.in_flight
        began = time.monotonic()
        status, _, _ = Http(keyd.socket, timeout=10).request("GET", "/v1/rest/default/users/fast")
        waited = time.monotonic() - began
        assert status == 200
        assert waited < 1.0, f"a third uid waited {waited:.2f}s behind two uids' slow calls"
    finally:
        outputs = [p.communicate(timeout=30)[0] for p in processes]
    statuses = [json.loads(out)["results"][0][0] for out in outputs]
    assert statuses == [200] * (2 * PER_UID), statuses  # the slow uids are served too, in turn
    assert standin.max_in_flight <= 16 and standin.problems() == []


def test_a_caller_hanging_up_on_pipelined_calls_leaks_no_pool_slot(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, standin: StandIn, keyd_factory: Any
) -> None:
    """Found by the review of FairSlots: closing a connection cancels its held calls first, then its
    waiting ones; each release in that turn handed its slot to a cancelled waiter (a 500 logged as
    InvalidStateError) and the slot stayed counted for good, until every REST call got 504."""
    config = base_config(bao, short_dir, secret_path[0])
    config["apps"]["default"]["rest"] = {
        "base_url": standin.url,
        "ca_file": str(standin.ca),
        "token_ttl": 10,
        "timeout": "5s",
        "retries": 0,
        "max_connections": 4,
    }
    config["grant"] = [{"uid": os.getuid(), "types": ["rest"], "rest": ["GET /users/*"]}]
    keyd = keyd_factory(config)
    standin.delay_for = lambda path: 1.0 if "/users/slow" in path else 0.0
    slow = b"GET /v1/rest/default/users/slow HTTP/1.1\r\nHost: keyd\r\n\r\n"
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(keyd.socket)
            conn.sendall(slow * 4)
            time.sleep(0.3)  # the calls hold or wait for slots; then the caller hangs up
        time.sleep(1.5)
        status, _, body = Http(keyd.socket, timeout=10).request("GET", "/v1/rest/default/users/fast")
        assert status == 200, body
    assert "InvalidStateError" not in keyd.logs()
