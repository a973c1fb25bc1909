"""`keyd dev` (what `make run` starts) as a new TalkJS developer uses it, for real: an OpenBao dev
server, keyd on it, the banner's commands, the demo key knowable, rotation, and your own test app."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest

from keyd.client import ClientError, ForbiddenError, KeydClient
from keyd.ops.dev import DEV_REST, STANDIN_LOG, bao_binary


@contextmanager
def dev(directory: Path, *args: str, stdin: str | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("VAULT_TOKEN", "BAO_TOKEN", "KEYD_SOCKET")}
    process = subprocess.Popen(
        [sys.executable, "-m", "keyd", "dev", *args],
        cwd=directory,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(stdin or "")
    process.stdin.close()
    banner = ""
    deadline = time.monotonic() + 60
    while "Press Ctrl-C" not in banner and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner += line
    try:
        assert "Press Ctrl-C" in banner, banner
        socket_path = directory / "run" / "keyd.sock"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(ClientError):  # not up yet
                if KeydClient(str(socket_path)).health()[0] == 200:
                    break
            time.sleep(0.1)
        yield process, banner
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def standins(pid: int) -> list[int]:
    """The TalkJS stand-in processes ``pid`` started."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"keyd.bench.standin" in Path(f"/proc/{c}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# One concrete call per grant in DEV_REST, and calls no grant allows.
GRANTED = [
    ("GET", "/users/alice", None),
    ("PUT", "/users/alice", {"name": "Alice"}),
    ("PUT", "/conversations/c1", {"participants": ["alice"]}),
    ("POST", "/conversations/c1/messages", [{"text": "hi", "type": "SystemMessage"}]),
]
UNGRANTED = [("DELETE", "/users/alice"), ("GET", "/conversations/c1/messages"), ("POST", "/users/alice")]


def test_the_rest_proxy_can_be_tried_against_a_local_standin(tmp_path: Path, node: str) -> None:
    assert len(GRANTED) == len(DEV_REST)
    with dev(tmp_path) as (process, banner):
        for rule in DEV_REST:
            assert rule in banner
        log = tmp_path / "run" / STANDIN_LOG
        assert f"what it received: run/{STANDIN_LOG}" in banner and "api.talkjs.com" not in banner
        [standin] = standins(process.pid)
        socket_path = str(tmp_path / "run" / "keyd.sock")
        env = {**os.environ, "KEYD_SOCKET": socket_path}
        # The banner's two sync lines, run as a developer pastes them (from the checkout, for node).
        curl_line = banner[banner.index('curl --unix-socket "$KEYD_SOCKET" -X PUT') :].split("\n\n")[0]
        curl_line = curl_line.split("\n  echo")[0]
        done = subprocess.run(
            ["sh", "-c", curl_line + " -i -sS"], capture_output=True, text=True, env=env, check=False
        )
        assert (
            done.returncode == 0 and "200 OK" in done.stdout and "X-Keyd-Upstream: talkjs" in done.stdout
        ), done
        sync_line = next(line.strip() for line in banner.splitlines() if "sync-users.js" in line)
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(
            ["sh", "-c", sync_line], capture_output=True, text=True, env=env, cwd=root, check=False
        )
        assert done.returncode == 0 and json.loads(done.stdout) == {"id": "alice", "status": 200}, done
        client = KeydClient(socket_path)
        for method, path, body in GRANTED:
            answer = client.rest(method, path, json=body)
            assert answer.status == 200 and answer.json() == {"ok": True}, (method, path)
        for method, path in UNGRANTED:
            with pytest.raises(ForbiddenError):
                client.rest(method, path)
        received = log.read_text().splitlines()
        expected = [f"{m} /v1/tDemoApp{p} -> 200" for m, p, _ in GRANTED]
        assert received == ["PUT /v1/tDemoApp/users/alice -> 200"] * 2 + expected, (
            "ungranted calls never reach it"
        )
        assert alive(standin)
    assert not alive(standin), "the stand-in is stopped with keyd dev"


def test_the_demo_key_is_knowable_and_rotation_can_be_tried(tmp_path: Path) -> None:
    with dev(tmp_path) as (process, banner):
        run = tmp_path / "run"
        key_file, token_file = run / "demo-key", run / "bao-token"
        assert (
            stat.S_IMODE(key_file.stat().st_mode) == 0o600
            and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        )
        key = key_file.read_text().strip()
        token = token_file.read_text().strip()
        assert key not in banner and token not in banner, "neither the key nor the dev token is printed"
        assert f"export KEYD_SOCKET={run / 'keyd.sock'}" in banner
        assert bao_binary() in banner and "BAO_ADDR=" in banner
        client = KeydClient(str(run / "keyd.sock"))
        claims = jwt.decode(
            client.user_token("alice"), key, algorithms=["HS256"], options={"verify_aud": False}
        )
        assert claims["sub"] == "alice"
        # Rotation as the banner says: bao kv put with the exports, then SIGHUP.
        address = re.search(r"BAO_ADDR=(\S+)", banner)
        assert address is not None
        env = {**os.environ, "BAO_ADDR": address.group(1), "BAO_TOKEN": token}
        subprocess.run(
            [
                bao_binary(),
                "kv",
                "put",
                "secret/talkjs/demo",
                "secret_key=sk_test_rotated_0123456789abcdefghijkl",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while client.health()[1]["apps"]["default"]["key_version"] != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        jwt.decode(client.user_token("bob"), "sk_test_rotated_0123456789abcdefghijkl", algorithms=["HS256"])
    assert not (tmp_path / "run" / "demo-key").exists() and not (tmp_path / "run" / "bao-token").exists()


def test_your_own_test_app_from_standard_input(tmp_path: Path) -> None:
    own = "sk_test_" + "x" * 24
    with dev(tmp_path, "--app-id", "tMyTestApp", "--key-file", "-", stdin=own + "\n") as (process, banner):
        assert own not in banner and "tMyTestApp" in banner
        # Your app's REST calls go to the real TalkJS (a stand-in would fake your app), and it says so.
        assert (
            "the real https://api.talkjs.com" in banner
            and "these calls change your TalkJS test app" in banner
        )
        assert standins(process.pid) == [] and not (tmp_path / "run" / STANDIN_LOG).exists()
        assert not (tmp_path / "run" / "demo-key").exists(), "your key is never written by keyd dev"
        token = KeydClient(str(tmp_path / "run" / "keyd.sock")).user_token("alice")
        claims = jwt.decode(token, own, algorithms=["HS256"])
        assert claims["iss"] == "tMyTestApp" and claims["sub"] == "alice"
    # Only one of the two is a usage error naming both.
    done = subprocess.run(
        [sys.executable, "-m", "keyd", "dev", "--app-id", "tX"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "--app-id and --key-file go together" in done.stderr
    assert json.dumps(own) not in done.stdout + done.stderr
