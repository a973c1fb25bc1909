"""The examples in examples/ run with their real runtimes (Node.js, PHP, curl, Python) against a live
keyd on OpenBao, and the tokens they get verify with PyJWT against the key in Vault.

The runtimes come from the fixtures in conftest.py (installed from Debian's packages when missing,
skipped with the reason only where that is impossible).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import jwt
import pytest

from keyd.ops.dev import free_port
from tests.conftest import base_config
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"
ALL_TYPES = ["user", "app", "signature", "webhook"]


@pytest.fixture
def keyd(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    config = base_config(bao, short_dir, path)
    config["grant"] = [{"types": ALL_TYPES}]
    proc = keyd_factory(config)
    proc.key = key
    return proc


def run(command: list[str], socket: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "KEYD_SOCKET": socket}
    return subprocess.run(command, input=stdin, capture_output=True, env=env, timeout=60, check=False)


def talkjs_signature(key: str, timestamp: str, body: bytes) -> str:
    return hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest().upper()


def check_client_cli(command: list[str], keyd) -> None:
    """The shared command-line contract of examples/node/keyd.js and examples/php/keyd.php."""
    done = run([*command, "token", "alice"], keyd.socket)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    claims = jwt.decode(doc["token"], keyd.key, algorithms=["HS256"], issuer="tTestApp")
    assert claims["sub"] == "alice" and claims["tokenType"] == "user" and doc["key_version"] == 1
    assert set(jwt.get_unverified_header(doc["token"])) == {"alg", "typ"}

    done = run([*command, "app-token"], keyd.socket)
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(json.loads(done.stdout)["token"], keyd.key, algorithms=["HS256"])
    assert claims["tokenType"] == "app" and "sub" not in claims

    done = run([*command, "signature", "alice"], keyd.socket)
    assert done.returncode == 0, done.stderr
    expected = hmac.new(keyd.key.encode(), b"alice", hashlib.sha256).hexdigest()
    assert json.loads(done.stdout)["signature"] == expected

    done = run([*command, "token", ""], keyd.socket)  # keyd's 422 becomes an error exit
    assert done.returncode == 1 and b"invalid_field" in done.stderr
    done = run([*command, "token", "alice"], keyd.socket + ".missing")
    assert done.returncode == 1 and b"unreachable" in done.stderr


def test_node_client(node, keyd):
    check_client_cli([node, str(EXAMPLES / "node" / "keyd.js")], keyd)


def test_php_client(php, keyd):
    command = [php, str(EXAMPLES / "php" / "keyd.php")]
    check_client_cli(command, keyd)
    body = b'{"type":"message.sent", "data": {}}'
    ts = str(int(time.time() * 1000))
    good = talkjs_signature(keyd.key, ts, body)
    for signature, valid in ((good, True), (good[:-1] + "0" if good[-1] != "0" else good[:-1] + "1", False)):
        done = run([*command, "verify", ts, signature], keyd.socket, stdin=body)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"valid": valid}


def test_curl_examples(keyd, short_dir):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    body = b'{"type":"message.sent"}'
    ts = str(int(time.time()))
    (short_dir / "body.json").write_bytes(body)
    env = {
        **os.environ,
        "KEYD_SOCKET": keyd.socket,
        "WEBHOOK_BODY_FILE": str(short_dir / "body.json"),
        "WEBHOOK_TIMESTAMP": ts,
        "WEBHOOK_SIGNATURE": talkjs_signature(keyd.key, ts, body),
    }
    done = subprocess.run(
        ["sh", str(EXAMPLES / "curl" / "keyd.sh"), "bob"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    answers = [(json.loads(lines[i]), lines[i + 1]) for i in range(0, 10, 2)]
    (user, s1), (app, s2), (sig, s3), (hook, s4), (health, s5) = answers
    assert (s1, s2, s3, s4, s5) == ("200",) * 5
    assert jwt.decode(user["token"], keyd.key, algorithms=["HS256"])["sub"] == "bob"
    assert jwt.decode(app["token"], keyd.key, algorithms=["HS256"])["tokenType"] == "app"
    assert sig["signature"] == hmac.new(keyd.key.encode(), b"bob", hashlib.sha256).hexdigest()
    assert hook == {"valid": True, "app": "default"}
    assert health["status"] == "ok"
    assert any(line.startswith("keyd_tokens_total{") for line in lines[10:])


# -- the tokenFetcher backends --------------------------------------------------------------------


@pytest.fixture(params=["node", "python"])
def backend(request, keyd) -> Iterator[str]:
    """examples/{node/backend.js, python/backend.py} on a free loopback port; yields its base URL."""
    if request.param == "node":
        command = [request.getfixturevalue("node"), str(EXAMPLES / "node" / "backend.js")]
    else:
        command = [sys.executable, str(EXAMPLES / "python" / "backend.py")]
    port = free_port()
    env = {
        **os.environ,
        "KEYD_SOCKET": keyd.socket,
        "PORT": str(port),
        "DEMO_SESSIONS": json.dumps({"s-alice": "alice", "s-mallory": "mallory"}),
        "DEMO_BANNED": json.dumps(["mallory"]),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening on" in line, line + proc.stdout.read().decode() if proc.poll() is not None else line
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310 - loopback test URL
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_token_endpoint_refuses_users_not_logged_in(backend, keyd):
    assert fetch(backend + "/talkjs-token")[0] == 401
    assert fetch(backend + "/talkjs-token", headers={"Cookie": "session=forged"})[0] == 401
    assert fetch(backend + "/talkjs-token", headers={"Cookie": "session=s-mallory"})[0] == 403
    status, token = fetch(backend + "/talkjs-token", headers={"Cookie": "session=s-alice"})
    assert status == 200
    claims = jwt.decode(token.decode(), keyd.key, algorithms=["HS256"], issuer="tTestApp")
    assert claims["sub"] == "alice"


def test_backend_webhook_receiver(backend, keyd):
    body = b'{"type": "message.sent", "data": {"message": {"text": "hi"}}}'
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-TalkJS-Timestamp": ts}
    headers["X-TalkJS-Signature"] = talkjs_signature(keyd.key, ts, body)
    status, answer = fetch(backend + "/talkjs-webhook", body, headers)
    assert status == 200 and json.loads(answer) == {"received": "message.sent"}
    assert fetch(backend + "/talkjs-webhook", body.replace(b"hi", b"ho"), headers)[0] == 401
    assert fetch(backend + "/talkjs-webhook", body, {"Content-Type": "application/json"})[0] == 401


# -- the REST proxy sync jobs ---------------------------------------------------------------------


@pytest.fixture
def rest_keyd(bao, secret_path, keyd_factory, short_dir):
    """keyd whose only grant is PUT /users/* through the proxy, to a strict TalkJS stand-in."""
    from tests.talkjs_standin import StandIn

    path, key = secret_path
    with StandIn(key, "tTestApp", short_dir) as standin:
        config = base_config(bao, short_dir, path)
        config["apps"]["default"]["rest"] = {"base_url": standin.url, "ca_file": str(standin.ca)}
        config["grant"] = [{"uid": os.getuid(), "types": ["rest"], "rest": ["PUT /users/*"]}]
        proc = keyd_factory(config)
        proc.standin = standin
        yield proc


@pytest.mark.parametrize("runtime", ["node", "php"])
def test_sync_job_examples_use_the_rest_proxy(runtime, request, rest_keyd):
    from tests.talkjs_standin import Action

    command = [
        request.getfixturevalue(runtime),
        str(EXAMPLES / runtime / f"sync-users.{'js' if runtime == 'node' else 'php'}"),
    ]
    standin = rest_keyd.standin
    standin.script.append(Action(status=429, headers={"Retry-After": "1"}))  # waited out, then retried
    users = [
        {"id": "alice", "name": "Alice", "email": ["alice@example.com"]},
        {"id": "bob smith é", "name": "Bob"},  # percent-encoded UTF-8: one segment
        {"id": "carol"},
    ]
    done = run(command, rest_keyd.socket, stdin=json.dumps(users).encode())
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert results == [
        {"id": "alice", "status": 200},
        {"id": "bob smith é", "status": 200},
        {"id": "carol", "status": 200},
    ]
    assert standin.problems() == []
    received = [(r.method, r.path, json.loads(r.body)) for r in standin.received]
    assert received == [
        ("PUT", "/v1/tTestApp/users/alice", {"name": "Alice", "email": ["alice@example.com"]}),
        ("PUT", "/v1/tTestApp/users/alice", {"name": "Alice", "email": ["alice@example.com"]}),
        ("PUT", "/v1/tTestApp/users/bob%20smith%20%C3%A9", {"name": "Bob"}),
        ("PUT", "/v1/tTestApp/users/carol", {}),
    ]
    # Ids keyd refuses to put in a path ("..", an encoded "/") are error lines and a failing exit code.
    done = run(command, rest_keyd.socket, stdin=json.dumps([{"id": ".."}, {"id": "a/../b"}]).encode())
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [line["error"] for line in lines] == ["invalid_path"] * 2
    assert all(len(line["message"]) > 10 and line["message"] != line["error"] for line in lines), lines
    assert len(standin.received) == 4


@pytest.fixture
def silent_socket(short_dir):
    """A socket that queues connections and never answers: keyd.socket while keyd cannot start."""
    path = short_dir / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    try:
        yield str(path)
    finally:
        server.close()


@pytest.mark.parametrize("runtime", ["node", "php", "curl"])
def test_examples_give_up_after_their_timeout_on_a_socket_that_never_answers(runtime, silent_socket, request):
    """Issue 22: callers hung on keyd.socket while keyd could not start; each example has a timeout."""
    if runtime == "curl":
        if not shutil.which("curl"):
            pytest.skip("curl is not installed")
        command = ["sh", str(EXAMPLES / "curl" / "keyd.sh"), "bob"]
    else:
        script = EXAMPLES / runtime / ("keyd.js" if runtime == "node" else "keyd.php")
        command = [request.getfixturevalue(runtime), str(script), "token", "alice"]
    started = time.monotonic()
    done = run(command, silent_socket)
    took = time.monotonic() - started
    assert done.returncode != 0, done
    assert 4 <= took < 20, took  # its 5 s timeout, not for ever (run() would kill it at 60 s)
    assert re.search(rb"in time|timed out|Timeout|timeout", done.stderr), done.stderr
