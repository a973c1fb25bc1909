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

from keyd.client import ClientError, KeydClient
from keyd.ops.dev import bao_binary


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


def test_the_demo_key_is_knowable_and_rotation_can_be_tried(tmp_path: Path) -> None:
    with dev(tmp_path) as (process, banner):
        run = tmp_path / "run"
        key_file, token_file = run / "demo-key", run / "bao-token"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        token = token_file.read_text().strip()
        assert key not in banner and token not in banner, "neither the key nor the dev token is printed"
        assert f"export KEYD_SOCKET={run / 'keyd.sock'}" in banner
        assert bao_binary() in banner and "BAO_ADDR=" in banner
        client = KeydClient(str(run / "keyd.sock"))
        claims = jwt.decode(client.user_token("alice"), key, algorithms=["HS256"], options={"verify_aud": False})
        assert claims["sub"] == "alice"
        # Rotation as the banner says: bao kv put with the exports, then SIGHUP.
        address = re.search(r"BAO_ADDR=(\S+)", banner)
        assert address is not None
        env = {**os.environ, "BAO_ADDR": address.group(1), "BAO_TOKEN": token}
        subprocess.run(
            [bao_binary(), "kv", "put", "secret/talkjs/demo", "secret_key=sk_test_rotated_0123456789abcdefghijkl"],
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
    with dev(tmp_path, "--app-id", "tMyTestApp", "--key-file", "-", stdin=own + "\n") as (_, banner):
        assert own not in banner and "tMyTestApp" in banner
        assert not (tmp_path / "run" / "demo-key").exists(), "your key is never written by keyd dev"
        token = KeydClient(str(tmp_path / "run" / "keyd.sock")).user_token("alice")
        claims = jwt.decode(token, own, algorithms=["HS256"])
        assert claims["iss"] == "tMyTestApp" and claims["sub"] == "alice"
    # Only one of the two is a usage error naming both.
    done = subprocess.run(
        [sys.executable, "-m", "keyd", "dev", "--app-id", "tX"], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert done.returncode == 2 and "--app-id and --key-file go together" in done.stderr
    assert json.dumps(own) not in done.stdout + done.stderr
