"""The socket and HTTP layer of a real keyd process: raw bytes, file permissions, lifecycle."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from keyd.ops.dev import BaoServer
from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, RawConnection, wait_until


class Raw(RawConnection):
    """A raw connection whose answers are JSON: ``answer()`` gives (status, str headers, document)."""

    def answer(self) -> tuple[int, dict[str, str], Any]:
        status, headers, body, _ = self.response()
        return status, {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}, json.loads(body)


def post(body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/tokens HTTP/%s\r\nHost: keyd\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (version, len(body), extra, body)
    )


@pytest.fixture(scope="module")
def shared(bao: BaoServer) -> Iterator[tuple[KeydProcess, str]]:
    """One keyd for the tests that only talk to it (starting a process per test is slow)."""
    root = bao.client()
    path, key = "talkjs/socket-" + secrets.token_hex(4), new_key()
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": key}, mount_point="secret")
    token = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    directory = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    config = base_config(bao, directory, path)
    config["server"]["request_timeout"] = "1s"
    proc = KeydProcess(directory, config, {"VAULT_TOKEN": token})
    try:
        proc.start()
        yield proc, key
    finally:
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def keyd(shared: tuple[KeydProcess, str]) -> KeydProcess:
    proc = shared[0]
    assert proc.process is not None and proc.process.poll() is None, proc.logs()
    return proc


@pytest.fixture
def key(shared: tuple[KeydProcess, str]) -> str:
    return shared[1]


@pytest.fixture
def own_keyd(bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path) -> KeydProcess:
    """A keyd of this test's own, for tests that stop it."""
    proc: KeydProcess = keyd_factory(base_config(bao, short_dir, secret_path[0]))
    return proc


def sub_of(doc: dict[str, Any], key: str) -> str:
    return str(jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"])


def test_keep_alive_serves_many_requests_on_one_connection(keyd: KeydProcess, key: str) -> None:
    raw = Raw(keyd.socket)
    for i in range(5):
        raw.send(post(b'{"user_id": "u%d"}' % i))
        status, headers, doc = raw.answer()
        assert status == 200
        assert "connection" not in headers
        assert sub_of(doc, key) == f"u{i}"
    raw.send(b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\n\r\n")
    assert raw.answer()[2]["status"] == "ok"
    raw.close()


def test_tokens_over_the_socket_are_pyjwts_byte_for_byte(keyd: KeydProcess, key: str) -> None:
    # Random ids (ASCII and any other text) through Api.dispatch's direct POST /v1/tokens path;
    # each token must be exactly what PyJWT encodes from its claims.
    rng = random.Random(6)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["é", "ユ", "\U0001f600", "\u00a0", "\\"]
    raw = Raw(keyd.socket)
    for i in range(300):
        user_id = "".join(rng.choice(alphabet[:95] if i % 2 else alphabet) for _ in range(rng.randint(1, 64)))
        raw.send(post(json.dumps({"user_id": user_id}).encode()))
        status, _, doc = raw.answer()
        assert status == 200, (user_id, doc)
        claims = jwt.decode(doc["token"], key, algorithms=["HS256"])
        assert claims["sub"] == user_id
        assert doc["token"] == jwt.encode(claims, key, algorithm="HS256")
    raw.close()


def test_pipelined_requests_in_one_write_are_answered_in_order(keyd: KeydProcess, key: str) -> None:
    raw = Raw(keyd.socket)
    raw.send(
        post(b'{"user_id": "one"}')
        + b"GET /v1/nope HTTP/1.1\r\nHost: keyd\r\n\r\n"
        + post(b'{"user_id": ""}')
        + post(b'{"user_id": "four"}')
    )
    answers = [raw.answer() for _ in range(4)]
    assert [a[0] for a in answers] == [200, 404, 422, 200]
    assert sub_of(answers[0][2], key) == "one"
    assert answers[1][2]["error"]["code"] == "not_found"
    assert answers[2][2]["error"]["code"] == "invalid_field"
    assert sub_of(answers[3][2], key) == "four"
    raw.close()


def test_answers_queued_for_a_burst_precede_a_rejection(keyd: KeydProcess, key: str) -> None:
    # Answers are written once per event-loop pass; a rejection that closes the connection must
    # still come after the answers to the requests before it.
    raw = Raw(keyd.socket)
    raw.send(post(b'{"user_id": "one"}') + post(b'{"user_id": "two"}') + b"\x16\x03\x01 not http\r\n\r\n")
    answers = [raw.answer() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 400]
    assert [sub_of(a[2], key) for a in answers[:2]] == ["one", "two"]
    assert answers[2][1]["connection"] == "close"
    raw.close()


def test_request_split_into_tiny_writes(keyd: KeydProcess, key: str) -> None:
    raw = Raw(keyd.socket)
    for byte in post(b'{"user_id": "slow"}'):
        raw.send(bytes([byte]))
    status, _, doc = raw.answer()
    assert status == 200 and sub_of(doc, key) == "slow"


def test_connection_close_is_honoured(keyd: KeydProcess) -> None:
    raw = Raw(keyd.socket)
    raw.send(post(b'{"user_id": "a"}', b"Connection: close\r\n"))
    status, headers, _ = raw.answer()
    assert (status, headers["connection"]) == (200, "close")
    assert raw.closed_by_peer()


def test_http_1_0_closes_after_one_response(keyd: KeydProcess) -> None:
    raw = Raw(keyd.socket)
    raw.send(post(b'{"user_id": "a"}', version=b"1.0"))
    assert raw.answer()[0] == 200
    assert raw.closed_by_peer()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
        b"HELLO\r\n\r\n",
        b"POST /v1/tokens HTTP/9.9\r\n\r\n",
        b"POST /v1/tokens HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/tokens HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /v1/health HTTP/1.1\r\nBad Header Line\r\n\r\n",
    ],
)
def test_bad_http_gets_400_and_a_close(keyd: KeydProcess, garbage: bytes) -> None:
    raw = Raw(keyd.socket)
    raw.send(garbage)
    status, headers, doc = raw.answer()
    assert status == 400, doc
    assert doc["error"]["code"] == "bad_request"
    assert headers["connection"] == "close"
    assert raw.closed_by_peer()
    keyd.wait_health(200)  # and keyd is fine


def test_oversize_body_by_content_length_is_413_before_the_body_arrives(keyd: KeydProcess) -> None:
    raw = Raw(keyd.socket)
    raw.send(
        b"POST /v1/tokens HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nContent-Length: 16385\r\n\r\n"
    )
    status, headers, doc = raw.answer()
    assert (status, doc["error"]["code"], headers["connection"]) == (413, "body_too_large", "close")
    assert "16384" in doc["error"]["message"]


def test_oversize_body_sent_in_full_still_gets_its_413(keyd: KeydProcess) -> None:
    raw = Raw(keyd.socket)
    raw.send(post(b'{"user_id": "' + b"x" * 40000 + b'"}'))
    status, _, doc = raw.answer()
    assert (status, doc["error"]["code"]) == (413, "body_too_large")


def test_expect_100_continue_is_answered_before_the_body(keyd: KeydProcess) -> None:
    """curl sends Expect: 100-continue for bodies over 1 KiB and would otherwise wait a second."""
    body = b'{"user_id": "e"' + b" " * 2000 + b"}"
    request = post(body, b"Expect: 100-continue\r\n")
    raw = Raw(keyd.socket)
    raw.send(request[: -len(body)])  # the headers only
    while b"\r\n\r\n" not in raw.buffer:
        assert raw.fill(), "closed before 100 Continue"
    assert raw.buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    raw.buffer = raw.buffer[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    raw.send(body)
    assert raw.answer()[0] == 200


def test_body_at_the_limit_is_accepted(keyd: KeydProcess) -> None:
    body = b'{"user_id": "a"' + b" " * (16384 - 16) + b"}"
    assert len(body) == 16384
    raw = Raw(keyd.socket)
    raw.send(post(body))
    assert raw.answer()[0] == 200


def test_chunked_request_body(keyd: KeydProcess, key: str) -> None:
    raw = Raw(keyd.socket)
    body = b'{"user_id": "chunky"}'
    raw.send(
        b"POST /v1/tokens HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (5, body[:5])
        + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
        + b"0\r\n\r\n"
    )
    status, _, doc = raw.answer()
    assert status == 200 and sub_of(doc, key) == "chunky"


def test_huge_headers_and_url(keyd: KeydProcess) -> None:
    raw = Raw(keyd.socket)
    raw.send(b"GET /v1/health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    status, _, doc = raw.answer()
    assert (status, doc["error"]["code"]) == (431, "headers_too_large")
    raw = Raw(keyd.socket)
    raw.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    status, _, doc = raw.answer()
    assert (status, doc["error"]["code"]) == (414, "uri_too_long")


def test_incomplete_request_times_out_with_408(keyd: KeydProcess) -> None:
    raw = Raw(keyd.socket)
    raw.send(b"POST /v1/tokens HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
    status, headers, doc = raw.answer()  # request_timeout is 1 s in this fixture
    assert (status, doc["error"]["code"], headers["connection"]) == (408, "request_timeout", "close")


def test_many_connections_at_once(keyd: KeydProcess) -> None:
    conns = [Raw(keyd.socket) for _ in range(50)]
    for i, raw in enumerate(conns):
        raw.send(post(b'{"user_id": "c%d"}' % i))
    assert all(raw.answer()[0] == 200 for raw in conns)
    for raw in conns:
        raw.close()


def run_to_exit(proc: KeydProcess) -> subprocess.CompletedProcess[str]:
    """Run `keyd run` on proc's config in the foreground, for daemons expected to refuse to start."""
    proc.write_config()
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | {"VAULT_TOKEN": "unused"}
    return subprocess.run(
        [sys.executable, "-m", "keyd", "run", "-c", str(proc.config_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )


# -- the socket file ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to another group needs root")
def test_socket_mode_and_group(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    import grp

    other = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(socket_mode="0660", socket_group=other.gr_name)
    keyd = keyd_factory(config)
    st = os.stat(keyd.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == other.gr_gid
    assert not [n for n in os.listdir(short_dir) if n.endswith(".tmp")]  # bound under a temporary name


def test_socket_mode_own_group(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    config["server"]["socket_mode"] = "0640"
    keyd = keyd_factory(config)
    st = os.stat(keyd.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, os.getgid())


def test_stale_socket_file_is_replaced(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(config["server"]["socket"])
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    keyd = keyd_factory(config)
    assert keyd.http().post_json("/v1/tokens", {"user_id": "a"})[0] == 200
    assert "replacing stale socket file" in keyd.logs()


def test_refuses_to_start_when_another_keyd_serves_on_the_path(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    first = keyd_factory(config)
    other_dir = short_dir / "second"
    other_dir.mkdir()
    second = KeydProcess(other_dir, config)
    result = run_to_exit(second)
    assert result.returncode == 2, result
    assert "another process is already serving" in result.stderr
    assert os.path.exists(first.socket)
    assert first.http().post_json("/v1/tokens", {"user_id": "a"})[0] == 200


def test_refuses_to_replace_a_file_that_is_not_a_socket(
    bao: BaoServer, secret_path: tuple[str, str], short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    Path(config["server"]["socket"]).write_text("precious")
    proc = KeydProcess(short_dir, config)
    result = run_to_exit(proc)
    assert result.returncode == 2
    assert "exists and is not a socket" in result.stderr
    assert Path(config["server"]["socket"]).read_text() == "precious"


def test_missing_socket_directory_is_a_clear_startup_error(
    bao: BaoServer, secret_path: tuple[str, str], short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    config["server"]["socket"] = str(short_dir / "nope" / "keyd.sock")
    proc = KeydProcess(short_dir, config)
    result = run_to_exit(proc)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "server.socket" in result.stderr


# -- shutdown ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_the_socket_and_exits_0(own_keyd: KeydProcess, sig: int) -> None:
    keyd = own_keyd
    keyd.signal(sig)
    assert keyd.process is not None
    assert keyd.process.wait(10) == 0
    assert not os.path.exists(keyd.socket)
    assert "stopped" in keyd.logs()


def test_sigterm_finishes_a_request_in_flight(own_keyd: KeydProcess, secret_path: tuple[str, str]) -> None:
    keyd, key = own_keyd, secret_path[1]
    raw = Raw(keyd.socket)
    request = post(b'{"user_id": "in-flight"}')
    raw.send(request[:-5])  # headers and most of the body
    idle = Raw(keyd.socket)
    idle.send(post(b'{"user_id": "idle"}'))
    assert idle.answer()[0] == 200
    keyd.signal(signal.SIGTERM)
    wait_until(lambda: not os.path.exists(keyd.socket), timeout=5, what="socket removed at shutdown")
    assert idle.closed_by_peer()  # idle keep-alive connections are closed at once
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        Raw(keyd.socket)  # no new connections
    raw.send(request[-5:])
    status, headers, doc = raw.answer()
    assert status == 200 and sub_of(doc, key) == "in-flight"
    assert headers["connection"] == "close"
    assert keyd.process is not None and keyd.process.wait(10) == 0


def test_shutdown_is_bounded_when_a_client_never_finishes(
    bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any, short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    config["server"].update(shutdown_timeout="1s", request_timeout="30s")
    keyd = keyd_factory(config)
    raw = Raw(keyd.socket)
    raw.send(b"POST /v1/tokens HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    time.sleep(0.1)  # let keyd see the partial request
    started = time.monotonic()
    keyd.signal(signal.SIGTERM)
    assert keyd.process is not None and keyd.process.wait(10) == 0
    assert time.monotonic() - started < 5
    assert raw.closed_by_peer()
